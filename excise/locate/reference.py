"""Reference values for ablation: zero, the mean over reference texts, or the value on another fact.

- ``"zero"``: the component is set to 0. Simple and input-independent, but it can push a layer far outside the
  range it was trained on, which exaggerates effects.
- ``"mean"``: the component's mean over every token of reference texts (Wang et al., 2022, "Interpretability in
  the Wild"). It keeps the layer's average output, so the measured effect is about the information the component
  carries rather than its bias. Computed as :func:`excise.edit.mean_activations` does, so a located site and its
  mean-ablation edit agree.
- ``"resample"``: the component's value on another fact at the same position (resample ablation, Chan et al.,
  2022, "Causal Scrubbing"). Each fact gets one partner from a seeded derangement of its fact set, so no fact is
  its own partner. The partner's prompt and target are right-padded or cut to the width of the batch.

Every method that takes ``reference=`` uses this module, so an estimate (attribution patching) and the measured
effect it is validated against (activation patching) replace a site by the same value.

NOTE: With ``"resample"`` a position past the partner's last token takes the partner's padding-token activation.
Facts of one template have similar lengths, where this is rare; mixed fact sets make it more common.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.completions import make_text_batch
from excise.data.facts import Fact
from excise.locate.components import FeatureSplice, capture_hooks
from excise.locate.metric import FactBatch, make_fact_batch
from excise.sites import SiteKind

Reference = Literal["zero", "mean", "resample"]
REFERENCES: tuple[Reference, ...] = get_args(Reference)


def check_reference(reference: str) -> None:
    """Raise ValueError unless ``reference`` is one of :data:`REFERENCES`."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")


def fact_texts(facts: Sequence[Fact]) -> list[str]:
    """Prompt + target of each fact: the default reference texts for mean ablation."""
    return [fact.prompt + fact.target for fact in facts]


def derangement(n: int, seed: int) -> list[int]:
    """Return a seeded permutation of ``range(n)`` without fixed points: ``partner[i] != i`` for all i."""
    if n < 2:
        raise ValueError(f"resample ablation needs at least 2 facts to pair, got {n}; use reference='mean'")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for position, index in enumerate(order):
        partner[index] = order[(position + 1) % n]  # one cycle through the shuffled order
    return partner


@dataclasses.dataclass(frozen=True)
class ReferenceValues:
    """Everything needed to build the replacement activations of one kind of site over a fact set.

    Build with :func:`prepare_reference`.

    Attributes:
        reference: ``"zero"``, ``"mean"`` or ``"resample"``.
        kind: Kind of site.
        hooks: Hooks whose components are replaced.
        means: Per hook, the mean component activation (``"mean"`` only), e.g. ``d_mlp`` or ``head_index d_head``;
            for residual hooks the mean ``d_model`` vector, the same at every position.
        partners: Per fact of the fact set, the index of its partner fact (``"resample"`` only).
        facts: The fact set the partners index into (``"resample"`` only).
    """

    reference: Reference
    kind: SiteKind
    hooks: tuple[str, ...]
    means: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    partners: tuple[int, ...] = ()
    facts: tuple[Fact, ...] = ()

    def settings(self) -> dict[str, object]:
        return {"reference": self.reference}


def prepare_reference(
    model: HookedTransformer,
    reference: Reference,
    kind: SiteKind,
    hooks: Sequence[str],
    facts: Sequence[Fact],
    *,
    reference_texts: Sequence[str] | None = None,
    sae: FeatureSplice | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> ReferenceValues:
    """Compute what :func:`replacement_activations` needs for ``facts``: means or partner assignments.

    Args:
        model: The model whose sites are ablated.
        reference: ``"zero"``, ``"mean"`` or ``"resample"``.
        kind: Kind of site.
        hooks: Hooks whose components are replaced.
        facts: The fact set that will be run (partners are drawn from it).
        reference_texts: Texts for ``"mean"``; default: prompt + target of ``facts``.
        sae: The SAE for ``sae_feature`` sites.
        batch_size: Texts per forward pass when computing means.
        seed: Seed of the partner derangement for ``"resample"``.
    """
    check_reference(reference)
    if reference == "zero":
        return ReferenceValues(reference, kind, tuple(hooks))
    if reference == "resample":
        partners = tuple(derangement(len(facts), seed))
        return ReferenceValues(reference, kind, tuple(hooks), partners=partners, facts=tuple(facts))
    texts = list(reference_texts) if reference_texts is not None else fact_texts(facts)
    if not texts:
        raise ValueError("mean ablation needs reference texts; pass reference_texts=[...] or leave it None")
    if kind == "sae_feature":
        means = _mean_components(model, kind, hooks, texts, sae, batch_size)
    else:
        from excise.edit.ablation import mean_activations

        means = mean_activations(model, list(hooks), texts, batch_size=batch_size)
    return ReferenceValues(reference, kind, tuple(hooks), means=means)


@torch.no_grad()
def replacement_activations(
    model: HookedTransformer,
    values: ReferenceValues,
    rows: slice | Sequence[int],
    clean: dict[str, Float[Tensor, "batch pos ..."]],
    *,
    sae: FeatureSplice | None = None,
) -> dict[str, Float[Tensor, "batch pos ..."]]:
    """Per hook, the activation each component takes when ablated, shaped like the clean activation.

    Args:
        model: The model.
        values: From :func:`prepare_reference`.
        rows: Which facts of the fact set the batch holds, in batch order (to find their partners).
        clean: Per hook, the clean component activation of the batch; gives shape, dtype and device.
        sae: The SAE for ``sae_feature`` sites.
    """
    if values.reference == "zero":
        return {hook: torch.zeros_like(clean[hook]) for hook in values.hooks}
    if values.reference == "mean":
        out = {}
        for hook in values.hooks:
            mean = values.means[hook].to(device=clean[hook].device, dtype=clean[hook].dtype)
            if tuple(mean.shape) != tuple(clean[hook].shape[2:]):
                raise ValueError(
                    f"mean for {hook!r} has shape {tuple(mean.shape)} but the activation's components have shape "
                    f"{tuple(clean[hook].shape[2:])}; prepare the reference with the same model and hooks"
                )
            out[hook] = mean.expand_as(clean[hook]).clone()
        return out
    indices = range(rows.start, rows.stop) if isinstance(rows, slice) else rows
    partner_facts = [values.facts[values.partners[i]] for i in indices]
    width = next(iter(clean.values())).shape[1]
    tokens = _fit_width(model, make_fact_batch(model, partner_facts), width)
    store: dict[str, Tensor] = {}
    with model.hooks(fwd_hooks=capture_hooks(values.kind, values.hooks, store, sae)):
        model(tokens, stop_at_layer=_stop_layer(model, values.hooks))
    return {hook: store[hook].detach() for hook in values.hooks}


def _fit_width(model: HookedTransformer, batch: FactBatch, width: int) -> Int[Tensor, "batch pos"]:
    tokens = batch.tokens[:, :width]
    if tokens.shape[1] < width:
        pad = torch.full((tokens.shape[0], width - tokens.shape[1]), _pad_id(model), dtype=tokens.dtype)
        tokens = torch.cat([tokens, pad.to(tokens.device)], dim=1)
    return tokens


def _pad_id(model: HookedTransformer) -> int:
    # The same choice as excise.completions: the pad token, else end-of-sequence, else 0.
    tokenizer = model.tokenizer
    if tokenizer is not None:
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if isinstance(candidate, int):
                return candidate
    return 0


def _stop_layer(model: HookedTransformer, hooks: Sequence[str]) -> int | None:
    # Only the blocks up to the last hooked one are needed to read the activations.
    from excise.locate.components import layer_of

    layers = [layer_of(hook) for hook in hooks]
    if any(layer is None for layer in layers):
        return None
    return min(model.cfg.n_layers, max(layer for layer in layers if layer is not None) + 1)


@torch.no_grad()
def _mean_components(
    model: HookedTransformer,
    kind: SiteKind,
    hooks: Sequence[str],
    texts: Sequence[str],
    sae: FeatureSplice | None,
    batch_size: int,
) -> dict[str, Tensor]:
    # Same definition as excise.edit.mean_activations (every real token of the texts), for hooks that only exist
    # with an SAE spliced in.
    sums: dict[str, Tensor] = {}
    count = 0
    for start in range(0, len(texts), batch_size):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size])
        mask = torch.arange(tokens.shape[1], device=lengths.device) < lengths.unsqueeze(1)
        store: dict[str, Tensor] = {}
        with model.hooks(fwd_hooks=capture_hooks(kind, hooks, store, sae)):
            model(tokens, stop_at_layer=_stop_layer(model, hooks))
        for hook in hooks:
            sums[hook] = sums.get(hook, 0) + store[hook][mask].float().sum(0).cpu()
        count += int(mask.sum())
    return {hook: total / count for hook, total in sums.items()}
