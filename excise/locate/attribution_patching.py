"""Attribution patching: a first-order estimate of every site's ablation effect from one backward pass.

For a metric ``m`` (by default the summed log-probability of each fact's target) and an activation ``a`` at a
site, replacing ``a`` by a reference ``a'`` changes the metric by about ``(a' - a) · ∂m/∂a`` (Nanda, 2023,
"Attribution Patching: Activation Patching At Industrial Scale"; Syed et al., 2023, "Attribution Patching
Outperforms Automated Circuit Discovery"). Two forward passes (the reference run, needed for resample ablation,
and the clean run) and one backward pass give the estimate for every site at once, where activation patching
needs a forward pass per site.

Scores here are the estimated *drop* of the mean metric, ``(a - a') · ∂m/∂a``, summed over token positions (an
edit ablates a site at every position) and averaged over facts. ``a'`` is zero, a mean over reference texts, or
another fact's activation (see :mod:`excise.locate.reference`).

Sites can be MLP neurons, attention heads, residual-stream positions, or the features of a spliced-in SAE. Heads
are query heads read through ``hook_z``, so grouped-query models are scored per query head. An SAE's
reconstruction error is kept as a constant, so the model's output is unchanged and gradients reach the features
through the decoder.

Warning:
    The estimate is linear. It is good for small changes and can be poor for sites whose ablation moves the
    model far (large activations, saturated softmax, zero-ablated residual positions). Check it against real
    ablations with :func:`excise.locate.validate.validate` before trusting a ranking, or use
    :mod:`excise.locate.integrated_gradients`, which follows the path to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.data.facts import Domain, Fact
from excise.locate.attribution import Attribution, rank_by_selectivity, resolve_sets
from excise.locate.components import (
    FeatureSplice,
    ForwardHooks,
    add_padded,
    capture_hooks,
    check_hooks,
    default_hooks,
    pad_to_common_width,
)
from excise.locate.metric import FactBatch, Metric, check_metric, iter_fact_batches_by_length, run_metric
from excise.locate.reference import Reference, prepare_reference, replacement_activations
from excise.sites import SITE_KINDS, SiteKind

SiteTarget = Literal["neuron", "head", "residual", "sae_feature"]
Positions = Literal["all", "last"]
SITE_TARGETS: tuple[SiteTarget, ...] = get_args(SiteTarget)
POSITIONS: tuple[Positions, ...] = get_args(Positions)


def attribution_patching(
    model: HookedTransformer,
    domain: Domain,
    *,
    kind: SiteTarget = "neuron",
    sets: Sequence[str] | None = ("forget", "retain"),
    positions: Positions = "all",
    batch_size: int = 16,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    hooks: Sequence[str] | None = None,
    sae: FeatureSplice | None = None,
    seed: int = 0,
) -> Attribution:
    """Score every site of ``kind`` by its estimated ablation effect on each fact set.

    The ranking score is the selectivity ``forget - retain`` when both sets are scored (see
    :func:`excise.locate.attribution.rank_by_selectivity`).

    Args:
        model: Any HookedTransformer with a tokenizer; its weights and gradients are not changed.
        domain: Facts to score.
        kind: ``"neuron"`` (``blocks.L.mlp.hook_post``), ``"head"`` (``blocks.L.attn.hook_z``), ``"residual"``
            (token positions of ``hook_resid_*``) or ``"sae_feature"`` (needs ``sae``).
        sets: Fact sets to score, each non-empty; None scores every non-empty set of the domain.
        positions: ``"all"`` sums over every position of prompt and target (as a weight edit acts), ``"last"`` keeps
            only the last prompt position. Ignored for residual sites, whose index is the position.
        batch_size: Facts per forward and backward pass.
        metric: See :mod:`excise.locate.metric`.
        reference: The ablated value: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference_texts: Texts for ``"mean"``; default each set's own prompts and targets.
        hooks: Hooks to score; default every hook of the kind.
        sae: The SAE for ``sae_feature`` sites.
        seed: Seed of the partner draw for ``"resample"``.
    """
    if kind not in SITE_TARGETS:
        raise ValueError(f"kind must be one of {SITE_TARGETS}, got {kind!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    set_names = resolve_sets(domain, sets)
    hook_list = list(hooks) if hooks is not None else default_hooks(model, kind, sae)
    check_hooks(model, kind, hook_list, sae)

    set_scores: dict[str, dict[str, Tensor]] = {}
    for which in set_names:
        set_scores[which] = fact_attributions(
            model,
            domain.facts(which),  # type: ignore[arg-type]
            hook_list,
            positions=positions,
            batch_size=batch_size,
            kind=kind,
            metric=metric,
            reference=reference,
            reference_texts=reference_texts,
            sae=sae,
            seed=seed,
        )
    return _as_attribution(model, domain, kind, set_scores, set_names, metric, reference, positions, sae, seed)


def _as_attribution(
    model: HookedTransformer,
    domain: Domain,
    kind: SiteKind,
    set_scores: dict[str, dict[str, Tensor]],
    set_names: list[str],
    metric: Metric,
    reference: Reference,
    positions: Positions,
    sae: FeatureSplice | None,
    seed: int,
) -> Attribution:
    if kind == "residual":
        set_scores = pad_to_common_width(set_scores)
    scores, ranking = rank_by_selectivity(set_scores)
    return Attribution(
        method="attribution_patching",
        metric=metric,
        kind=kind,
        scores=scores,
        set_scores=set_scores,
        settings={
            "ablation": reference,
            "reference": reference,
            "positions": positions,
            "ranking": ranking,
            "n_facts": {which: len(domain.facts(which)) for which in set_names},  # type: ignore[arg-type]
            "seed": seed,
        },
        sae_id=sae.sae_id if kind == "sae_feature" and sae is not None else None,
    )


def attribution_patching_multi(
    model: HookedTransformer,
    domain: Domain,
    *,
    kinds: Sequence[SiteTarget] = ("neuron", "head"),
    sets: Sequence[str] | None = ("forget", "retain"),
    positions: Positions = "all",
    batch_size: int = 16,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    sae: FeatureSplice | None = None,
    seed: int = 0,
) -> dict[str, Attribution]:
    """:func:`attribution_patching` for several kinds of site, sharing one forward and backward pass per batch.

    Returns one Attribution per kind, each equal to what :func:`attribution_patching` gives for that kind alone,
    at about the cost of one of them.
    """
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must name distinct site kinds from {SITE_TARGETS}, got {list(kinds)}")
    for kind in kinds:
        if kind not in SITE_TARGETS:
            raise ValueError(f"kinds must be drawn from {SITE_TARGETS}, got {kind!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    set_names = resolve_sets(domain, sets)
    groups: dict[SiteKind, list[str]] = {kind: default_hooks(model, kind, sae) for kind in kinds}
    for kind, hooks in groups.items():
        check_hooks(model, kind, hooks, sae)
    per_set = {
        which: _attribute(
            model,
            domain.facts(which),  # type: ignore[arg-type]
            groups,
            positions=positions,
            batch_size=batch_size,
            metric=metric,
            reference=reference,
            reference_texts=reference_texts,
            sae=sae,
            seed=seed,
        )
        for which in set_names
    }
    out = {}
    for kind in kinds:
        set_scores = {which: per_set[which][kind] for which in set_names}
        out[kind] = _as_attribution(model, domain, kind, set_scores, set_names, metric, reference, positions, sae, seed)
    return out


def fact_attributions(
    model: HookedTransformer,
    facts: Sequence[Fact],
    hooks: Sequence[str],
    *,
    positions: Positions = "all",
    batch_size: int = 16,
    kind: SiteKind | None = None,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    sae: FeatureSplice | None = None,
    seed: int = 0,
) -> dict[str, Float[Tensor, " component"]]:
    """Estimate the drop in the mean metric when each component of each hook is replaced by its reference value.

    ``kind`` defaults to the kind the hook names imply (``mlp.hook_post``: neurons, ``attn.hook_z``: heads).
    Residual scores are per position, as long as the widest batch.
    """
    kind = kind if kind is not None else _kind_of(hooks)
    if kind not in SITE_KINDS:
        raise ValueError(f"kind must be one of {SITE_KINDS}, got {kind!r}")
    check_hooks(model, kind, hooks, sae)
    return _attribute(
        model,
        facts,
        {kind: list(hooks)},
        positions=positions,
        batch_size=batch_size,
        metric=metric,
        reference=reference,
        reference_texts=reference_texts,
        sae=sae,
        seed=seed,
    )[kind]


def _attribute(
    model: HookedTransformer,
    facts: Sequence[Fact],
    groups: dict[SiteKind, list[str]],
    *,
    positions: Positions,
    batch_size: int,
    metric: Metric,
    reference: Reference,
    reference_texts: Sequence[str] | None,
    sae: FeatureSplice | None,
    seed: int,
) -> dict[SiteKind, dict[str, Tensor]]:
    """Attribution for several kinds of site at once: one forward and backward pass per batch serves them all."""
    check_metric(metric)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    values = {
        kind: prepare_reference(
            model,
            reference,
            kind,
            hooks,
            facts,
            reference_texts=reference_texts,
            sae=sae,
            batch_size=batch_size,
            seed=seed,
        )
        for kind, hooks in groups.items()
    }
    totals: dict[SiteKind, dict[str, Tensor]] = {kind: {} for kind in groups}
    n_batches = -(-len(facts) // batch_size)
    for rows, batch in tqdm(
        iter_fact_batches_by_length(model, facts, batch_size), total=n_batches, desc="attribution patching", leave=False
    ):
        activations, gradients = _gradients_by_kind(model, batch, groups, metric, sae)
        mask = position_mask(batch, positions)
        for kind, hooks in groups.items():
            replacements = replacement_activations(model, values[kind], rows, activations[kind], sae=sae)
            for name in hooks:
                # Drop of the metric ≈ (a - a') · ∂m/∂a, summed over the ablated positions of the batch's facts.
                product = (activations[kind][name] - replacements[name]) * gradients[kind][name]
                scores = reduce_to_components(product, mask, kind).float().cpu()
                totals[kind][name] = add_padded(totals[kind].get(name), scores)
    return {kind: {name: totals[kind][name] / len(facts) for name in hooks} for kind, hooks in groups.items()}


def gradients_and_activations(
    model: HookedTransformer,
    batch: FactBatch,
    kind: SiteKind,
    hooks: Sequence[str],
    metric: Metric,
    sae: FeatureSplice | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One clean forward and backward pass: per hook, the component activation and the gradient of the summed metric.

    The model's parameters get no ``.grad``: the graph starts at the embeddings, and only the activations are
    differentiated.
    """
    activations, gradients = _gradients_by_kind(model, batch, {kind: list(hooks)}, metric, sae)
    return activations[kind], gradients[kind]


def _gradients_by_kind(
    model: HookedTransformer,
    batch: FactBatch,
    groups: dict[SiteKind, list[str]],
    metric: Metric,
    sae: FeatureSplice | None,
) -> tuple[dict[SiteKind, dict[str, Tensor]], dict[SiteKind, dict[str, Tensor]]]:
    stores: dict[SiteKind, dict[str, Tensor]] = {kind: {} for kind in groups}

    def start_graph(embedding: Tensor, hook: HookPoint) -> Tensor:
        return embedding.detach().requires_grad_(True)

    fwd_hooks: ForwardHooks = [("hook_embed", start_graph)]
    for kind, hooks in groups.items():
        fwd_hooks += capture_hooks(kind, hooks, stores[kind], sae)
    pairs: list[tuple[SiteKind, str]] = [(kind, name) for kind, hooks in groups.items() for name in hooks]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
        values = run_metric(model, batch, metric)
        grads = torch.autograd.grad(values.sum(), [stores[k][n] for k, n in pairs], allow_unused=True)
    gradients: dict[SiteKind, dict[str, Tensor]] = {kind: {} for kind in groups}
    for (kind, name), grad in zip(pairs, grads, strict=True):
        gradients[kind][name] = grad if grad is not None else torch.zeros_like(stores[kind][name])
    activations: dict[SiteKind, dict[str, Tensor]] = {
        kind: {name: a.detach() for name, a in store.items()} for kind, store in stores.items()
    }
    return activations, gradients


def position_mask(batch: FactBatch, positions: Positions) -> Tensor:
    """Boolean ``batch pos`` mask of the positions a site is ablated at: real tokens, or the last prompt token."""
    completions = batch.completions
    if positions == "all":
        lengths = completions.prompt_lengths + completions.completion_lengths
        return torch.arange(batch.width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    mask = torch.zeros(batch.tokens.shape, dtype=torch.bool, device=batch.tokens.device)
    mask[torch.arange(len(batch)), completions.last_prompt_positions] = True
    return mask


def reduce_to_components(
    product: Float[Tensor, "batch pos ..."], mask: Tensor, kind: SiteKind
) -> Float[Tensor, " component"]:
    """Sum a per-element product to one value per component: over the masked positions and any trailing axis.

    For residual sites the components are the positions, and every real position is kept.
    """
    if kind == "residual":
        return product.flatten(2).sum(dim=(0, 2))
    selected = product[mask]  # (tokens, component, ...)
    return selected.reshape(selected.shape[0], selected.shape[1], -1).sum(dim=(0, 2))


def _kind_of(hooks: Sequence[str]) -> SiteKind:
    if all(hook.endswith("mlp.hook_post") for hook in hooks):
        return "neuron"
    if all(hook.endswith("attn.hook_z") for hook in hooks):
        return "head"
    if all("hook_resid" in hook for hook in hooks):
        return "residual"
    raise ValueError(f"cannot tell the site kind from hooks {list(hooks)[:3]}...; pass kind=...")
