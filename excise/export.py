"""Export an (edited) HookedTransformer as a Hugging Face Llama checkpoint that ``transformers`` loads.

Deep forgetting is judged on the weights a user ships, so an edit must survive the trip out of TransformerLens.
:func:`export_hf` writes ``config.json`` and ``model.safetensors`` (plus the tokenizer when the model has one) for
``LlamaForCausalLM``, the layout of the default SmolLM2 model: RMSNorm, rotary position embeddings, a gated SiLU
MLP and grouped-query attention.

The weights are mapped without approximation:

- ``W_Q``, ``W_K``, ``W_V`` ``(head_index, d_model, d_head)`` become ``q/k/v_proj.weight`` ``(heads * d_head,
  d_model)``, ``W_O`` becomes ``o_proj.weight``; ``W_gate``, ``W_in``, ``W_out`` become ``gate/up/down_proj``.
- TransformerLens adds the gated MLP's ``b_in`` after the gate product, to ``hook_post``; its effect on the output
  is the constant ``b_in @ W_out``, which is folded into ``down_proj.bias``.
- Mean ablation and direction removal write non-zero ``b_O`` and ``b_out``. The config then sets
  ``attention_bias`` and ``mlp_bias``, and the biases Llama has but TransformerLens lacks (gate and up
  projections) are written as zeros.
- A model loaded with ``fold_ln`` has weightless RMSNorm (``RMSPre``); its norms are exported with weight 1.
- Input and output embeddings are tied only when ``W_U`` equals ``W_E`` transposed bit for bit (edits such as
  direction removal change ``W_E`` alone).

Warning:
    ``b_U`` has no place in ``LlamaForCausalLM``. A constant ``b_U`` (what ``center_unembed`` leaves) only shifts
    every logit and is dropped with a log message; any other non-zero ``b_U`` raises ValueError.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import einops
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.io import atomic_folder

if TYPE_CHECKING:
    from excise.edit.base import Edit

logger = logging.getLogger(__name__)

__all__ = ["export_hf", "llama_config", "llama_state_dict"]


def export_hf(
    model: HookedTransformer,
    path: str | Path,
    *,
    edit: Edit | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with ``edit`` baked into a copy, if given) as a Hugging Face Llama checkpoint folder.

    Args:
        model: A llama-layout HookedTransformer; it is not changed.
        path: Output folder, written atomically (a crash leaves no half-written folder).
        edit: Optional edit to bake first; it must have a weight form.
        dtype: Dtype of the saved weights; default the model's.
        overwrite: Replace an existing folder.

    Returns:
        The folder, loadable with ``transformers.AutoModelForCausalLM.from_pretrained(path)``.
    """
    from transformers import LlamaForCausalLM

    if edit is not None:
        model = edit.apply(model)
    state = llama_state_dict(model)
    config = llama_config(model, dtype=dtype)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    if config.tie_word_embeddings:
        # One shared tensor, so that save_pretrained writes the tied embedding once.
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    with atomic_folder(Path(path), overwrite=overwrite) as folder:
        hf_model.save_pretrained(folder, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(folder)
    logger.info("exported %s to %s", model.cfg.model_name, path)
    return Path(path)


def llama_config(model: HookedTransformer, *, dtype: torch.dtype | None = None) -> Any:
    """``transformers.LlamaConfig`` for ``model``; raises ValueError when the model is not llama-shaped."""
    from transformers import LlamaConfig

    cfg = model.cfg
    state = llama_state_dict(model)
    attention_bias = any(".self_attn." in name and name.endswith(".bias") for name in state)
    mlp_bias = any(".mlp." in name and name.endswith(".bias") for name in state)
    tied = bool(torch.equal(model.W_U, model.W_E.T))
    assert cfg.d_mlp is not None  # checked by _check_llama_layout
    settings: dict[str, Any] = dict(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads,
        head_dim=cfg.d_head,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        rope_theta=float(cfg.rotary_base),
        hidden_act="silu",
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=tied,
        torch_dtype=dtype or cfg.dtype,
        bos_token_id=_token_id(model, "bos_token_id"),
        eos_token_id=_token_id(model, "eos_token_id"),
        pad_token_id=_token_id(model, "pad_token_id"),
    )
    # rope_theta and torch_dtype are accepted by every transformers version since 4.51 (5.x maps them to
    # rope_parameters and dtype), but 5.x's signature no longer names them.
    return LlamaConfig(**settings)


@torch.no_grad()
def llama_state_dict(model: HookedTransformer) -> dict[str, Tensor]:
    """The ``LlamaForCausalLM`` state dict equivalent to ``model``'s weights (CPU tensors, model dtype).

    Bias entries are present only when one of their kind (attention or MLP) is non-zero, which is also when
    :func:`llama_config` turns them on. ``lm_head.weight`` is always present, also when it equals the embedding.
    """
    _check_llama_layout(model)
    state: dict[str, Tensor] = {"model.embed_tokens.weight": model.W_E}
    for layer, block in enumerate(model.blocks):
        prefix = f"model.layers.{layer}"
        attn = block.attn
        # Grouped-query attention keeps one key/value head per group in _W_K/_W_V; W_K/W_V repeat them per query head.
        w_k, w_v = getattr(attn, "_W_K", attn.W_K), getattr(attn, "_W_V", attn.W_V)
        b_k, b_v = getattr(attn, "_b_K", attn.b_K), getattr(attn, "_b_V", attn.b_V)
        w_gate, w_in, w_out, b_in, b_out = (
            model.get_parameter(f"blocks.{layer}.mlp.{name}") for name in ("W_gate", "W_in", "W_out", "b_in", "b_out")
        )
        state[f"{prefix}.input_layernorm.weight"] = _norm_weight(model, block.ln1)
        state[f"{prefix}.self_attn.q_proj.weight"] = einops.rearrange(attn.W_Q, "n m h -> (n h) m")
        state[f"{prefix}.self_attn.k_proj.weight"] = einops.rearrange(w_k, "n m h -> (n h) m")
        state[f"{prefix}.self_attn.v_proj.weight"] = einops.rearrange(w_v, "n m h -> (n h) m")
        state[f"{prefix}.self_attn.o_proj.weight"] = einops.rearrange(attn.W_O, "n h m -> m (n h)")
        state[f"{prefix}.self_attn.q_proj.bias"] = einops.rearrange(attn.b_Q, "n h -> (n h)")
        state[f"{prefix}.self_attn.k_proj.bias"] = einops.rearrange(b_k, "n h -> (n h)")
        state[f"{prefix}.self_attn.v_proj.bias"] = einops.rearrange(b_v, "n h -> (n h)")
        state[f"{prefix}.self_attn.o_proj.bias"] = model.get_parameter(f"blocks.{layer}.attn.b_O")
        state[f"{prefix}.post_attention_layernorm.weight"] = _norm_weight(model, block.ln2)
        state[f"{prefix}.mlp.gate_proj.weight"] = w_gate.T
        state[f"{prefix}.mlp.up_proj.weight"] = w_in.T
        state[f"{prefix}.mlp.down_proj.weight"] = w_out.T
        state[f"{prefix}.mlp.gate_proj.bias"] = torch.zeros_like(b_in)
        state[f"{prefix}.mlp.up_proj.bias"] = torch.zeros_like(b_in)
        state[f"{prefix}.mlp.down_proj.bias"] = b_out + b_in @ w_out
    state["model.norm.weight"] = _norm_weight(model, model.ln_final)
    state["lm_head.weight"] = model.W_U.T
    _check_unembed_bias(model)

    attention_bias = any(bool(t.any()) for n, t in state.items() if ".self_attn." in n and n.endswith(".bias"))
    mlp_bias = any(bool(t.any()) for n, t in state.items() if ".mlp." in n and n.endswith(".bias"))
    kept = {}
    for name, tensor in state.items():
        if name.endswith(".bias") and not (attention_bias if ".self_attn." in name else mlp_bias):
            continue
        kept[name] = tensor.detach().cpu().contiguous().clone()
    return kept


def _check_llama_layout(model: HookedTransformer) -> None:
    cfg = model.cfg
    problems = []
    if cfg.normalization_type not in ("RMS", "RMSPre"):
        problems.append(f"normalization_type={cfg.normalization_type!r} (Llama needs 'RMS' or 'RMSPre')")
    if cfg.positional_embedding_type != "rotary":
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (Llama needs 'rotary')")
    if not cfg.gated_mlp or cfg.act_fn not in ("silu", "swish"):
        problems.append(f"gated_mlp={cfg.gated_mlp}, act_fn={cfg.act_fn!r} (Llama needs a gated SiLU MLP)")
    if cfg.d_mlp is None or cfg.attn_only:
        problems.append("no MLP layers")
    if cfg.rotary_adjacent_pairs:
        problems.append("rotary_adjacent_pairs=True (Llama rotates the two halves of each head)")
    if cfg.rotary_dim != cfg.d_head:
        problems.append(f"rotary_dim={cfg.rotary_dim} differs from d_head={cfg.d_head}")
    if cfg.use_NTK_by_parts_rope:
        problems.append("NTK-by-parts rotary scaling (Llama 3.1 rope_scaling) is not exported")
    if cfg.parallel_attn_mlp:
        problems.append("parallel attention and MLP")
    if not math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head), rel_tol=1e-6):
        problems.append(f"attn_scale={cfg.attn_scale} (Llama divides by sqrt(d_head))")
    if cfg.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(cfg, "use_qk_norm", False):
        problems.append("query/key normalization")
    if problems:
        raise ValueError(
            f"model {cfg.model_name!r} does not have the Llama layout that export_hf writes: " + "; ".join(problems)
        )


def _norm_weight(model: HookedTransformer, norm: torch.nn.Module) -> Tensor:
    weight = getattr(norm, "w", None)
    if weight is None:  # RMSPre: the norm weights were folded into the next layer's matrices
        return torch.ones(model.cfg.d_model, dtype=model.cfg.dtype, device=model.cfg.device)
    return weight


def _check_unembed_bias(model: HookedTransformer) -> None:
    bias = model.b_U
    if not bool(bias.any()):
        return
    if bool((bias == bias[0]).all()):
        logger.info("dropping a constant b_U of %.3g: it shifts every logit equally", float(bias[0]))
        return
    raise ValueError(
        "the model has a non-constant unembedding bias b_U, which LlamaForCausalLM cannot hold; "
        "export a model without b_U (TransformerLens sets it to zero for Llama checkpoints)"
    )


def _token_id(model: HookedTransformer, name: str) -> int | None:
    if model.tokenizer is None:
        return None
    value = getattr(model.tokenizer, name, None)
    return int(value) if value is not None else None
