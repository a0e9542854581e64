"""Models from the Hugging Face hub, through TransformerLens' list of officially supported names.

A name that is not an offline model (see :data:`excise.models.gguf.OFFLINE_MODELS`) goes to
``HookedTransformer.from_pretrained_no_processing``, which checks it against its own list of official names and aliases
(``transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES``) and downloads the weights from the hub, or reads
them from the local Hugging Face cache. Two things are checked first, so the user gets a clear error instead of a
stack trace from deep inside transformers:

* a name that is neither offline nor known to TransformerLens raises a ValueError listing close matches;
* a load that fails because the hub cannot be reached (no network, or ``HF_HUB_OFFLINE=1`` with the model missing
  from the local cache) is reported as such, naming the models that work offline.
"""

from __future__ import annotations

import difflib

import huggingface_hub.constants
import torch
import transformer_lens.loading_from_pretrained as tl_loading
from transformer_lens import HookedTransformer
from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

__all__ = ["ModelUnavailableError", "close_matches", "hooked_class", "load_from_hub", "official_name"]


class ModelUnavailableError(RuntimeError):
    """A known model could not be loaded because the hub is unreachable and the model is not cached locally."""


def official_name(name: str) -> str | None:
    """Return TransformerLens' official name for ``name`` (an official name or alias, any case), else None."""
    return tl_loading.make_model_alias_map().get(name.lower())


def close_matches(name: str, extra: tuple[str, ...] = (), *, n: int = 5) -> list[str]:
    """Return up to ``n`` known model names (``extra`` first, then TransformerLens' names) that resemble ``name``."""
    candidates = {candidate.lower(): candidate for candidate in (*OFFICIAL_MODEL_NAMES, *extra)}
    for alias, official in tl_loading.make_model_alias_map().items():
        candidates.setdefault(alias, official)
    # Also compare with the part after the organisation, so "gemma-2-2b" finds "google/gemma-2-2b".
    for official in OFFICIAL_MODEL_NAMES:
        candidates.setdefault(official.split("/")[-1].lower(), official)
    queries = dict.fromkeys((name.lower(), name.lower().split("/")[-1]))
    matches = [match for query in queries for match in difflib.get_close_matches(query, list(candidates), 3 * n, 0.6)]
    ordered = dict.fromkeys(candidates[match] for match in matches)
    return list(ordered)[:n]


def hooked_class(sae_transformer: bool) -> type[HookedTransformer]:
    """Return sae-lens' ``HookedSAETransformer`` if ``sae_transformer``, else ``HookedTransformer``."""
    if not sae_transformer:
        return HookedTransformer
    from sae_lens import HookedSAETransformer  # imported on demand because it adds over a second to the import

    return HookedSAETransformer


def load_from_hub(
    name: str,
    *,
    device: str,
    dtype: torch.dtype,
    sae_transformer: bool,
    offline_names: tuple[str, ...],
) -> HookedTransformer:
    """Load ``name`` with TransformerLens, without weight processing (see :func:`excise.models.load`).

    Raises:
        ValueError: ``name`` is not an official TransformerLens name or alias; the message lists close matches.
        ModelUnavailableError: The hub cannot be reached and the model is not in the local Hugging Face cache.
    """
    official = official_name(name)
    if official is None:
        suggestions = close_matches(name, offline_names)
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        raise ValueError(
            f"unknown model name {name!r}.{hint} Offline models: {', '.join(offline_names)}. Any other name must be "
            "one of TransformerLens' official names or aliases "
            "(transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
        )
    try:
        model = hooked_class(sae_transformer).from_pretrained_no_processing(official, device=device, dtype=dtype)
    except OSError as error:  # transformers and huggingface_hub report hub and cache misses as OSError
        reason = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
            if huggingface_hub.constants.HF_HUB_OFFLINE
            else "fetching it from the Hugging Face hub failed (no network, or no access to the repository)"
        )
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailableError(
            f"cannot load {official!r}: {reason} ({first_line}). Models that load without the hub: "
            f"{', '.join(offline_names)}."
        ) from error
    model.eval()
    return model
