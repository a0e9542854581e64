"""Integrated gradients: attribution along the straight path from the reference activation to the real one.

Attribution patching reads the gradient at the clean activation only. Where the metric saturates (the model is
already sure of the target) that gradient is small even for a site whose removal would destroy the prediction, and
the linear estimate misses it. Integrated gradients (Sundararajan et al., 2017, "Axiomatic Attribution for Deep
Networks") averages the gradient over activations interpolated between the reference ``a'`` and the real ``a``:

    IG_i = (a_i - a'_i) · mean over α of ∂m/∂a_i at a' + α (a - a'),  α = (k + 0.5) / steps, k = 0 .. steps - 1

Knowledge neurons (Dai et al., 2022, "Knowledge Neurons in Pretrained Transformers") apply this to the MLP neurons
of one layer at a time, scaling the whole layer together at the prompt's last position from a zero baseline
(``positions="last", reference="zero"``, 20 steps). The same is done here for every hook separately, for any site
kind and reference. Completeness holds per hook: the scores of one hook sum to about the metric's change when the
whole hook is moved to its reference. The sum is exact in the limit of many steps.

Cost: for every hook, ``steps`` forward and backward passes of the batch from that hook's layer on. The steps of a
batch run together as one larger batch (``max_rows`` bounds it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.data.facts import Domain, Fact
from excise.locate.attribution import Attribution, rank_by_selectivity, resolve_sets
from excise.locate.attribution_patching import POSITIONS, Positions, position_mask, reduce_to_components
from excise.locate.components import (
    FeatureSplice,
    add_padded,
    check_hooks,
    component_hooks,
    default_hooks,
    layer_of,
    pad_to_common_width,
    run_clean,
)
from excise.locate.metric import FactBatch, Metric, check_metric, iter_fact_batches_by_length, run_metric
from excise.locate.reference import Reference, prepare_reference, replacement_activations
from excise.sites import SiteKind


def integrated_gradients(
    model: HookedTransformer,
    domain: Domain,
    *,
    kind: SiteKind = "neuron",
    hooks: Sequence[str] | None = None,
    sets: Sequence[str] | None = None,
    steps: int = 20,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    positions: Positions = "all",
    sae: FeatureSplice | None = None,
    batch_size: int = 8,
    max_rows: int = 256,
    seed: int = 0,
) -> Attribution:
    """Score every site of ``kind`` by integrated gradients from its reference value, per fact set.

    The ranking score is the selectivity ``forget - retain``.

    Args:
        model: Any HookedTransformer with a tokenizer; not changed.
        domain: Facts to score.
        kind: ``"neuron"``, ``"head"``, ``"residual"`` or ``"sae_feature"``.
        hooks: Hooks to score; default every hook of the kind.
        sets: Fact sets; default every non-empty set.
        steps: Points on the path (midpoint rule). 20 is the knowledge-neuron setting; check convergence with
            :func:`ig_completeness`.
        metric: See :mod:`excise.locate.metric`.
        reference: The path's start: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference_texts: Texts for ``"mean"``; default each set's prompts and targets.
        positions: ``"all"`` scales the hook at every position, ``"last"`` at the last prompt position only.
        sae: The SAE for ``sae_feature`` sites.
        batch_size: Facts per batch.
        max_rows: Rows per forward pass (facts times path points).
        seed: Seed of the partner draw for ``"resample"``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    hook_list = list(hooks) if hooks is not None else default_hooks(model, kind, sae)
    check_hooks(model, kind, hook_list, sae)
    set_names = resolve_sets(domain, sets)
    set_scores = {
        which: fact_integrated_gradients(
            model,
            domain.facts(which),  # type: ignore[arg-type]
            hook_list,
            kind=kind,
            steps=steps,
            metric=metric,
            reference=reference,
            reference_texts=reference_texts,
            positions=positions,
            sae=sae,
            batch_size=batch_size,
            max_rows=max_rows,
            seed=seed,
        )
        for which in set_names
    }
    if kind == "residual":
        set_scores = pad_to_common_width(set_scores)
    scores, ranking = rank_by_selectivity(set_scores)
    return Attribution(
        method="integrated_gradients",
        metric=metric,
        kind=kind,
        scores=scores,
        set_scores=set_scores,
        settings={
            "reference": reference,
            "positions": positions,
            "steps": steps,
            "ranking": ranking,
            "n_facts": {which: len(domain.facts(which)) for which in set_names},  # type: ignore[arg-type]
            "seed": seed,
        },
        sae_id=sae.sae_id if kind == "sae_feature" and sae is not None else None,
    )


def fact_integrated_gradients(
    model: HookedTransformer,
    facts: Sequence[Fact],
    hooks: Sequence[str],
    *,
    kind: SiteKind,
    steps: int = 20,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    positions: Positions = "all",
    sae: FeatureSplice | None = None,
    batch_size: int = 8,
    max_rows: int = 256,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Integrated-gradients score of each component of each hook, averaged over ``facts``."""
    check_metric(metric)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    values = prepare_reference(
        model, reference, kind, hooks, facts, reference_texts=reference_texts, sae=sae, batch_size=batch_size, seed=seed
    )
    totals: dict[str, Tensor] = {}
    n_batches = -(-len(facts) // batch_size)
    with tqdm(total=n_batches * len(hooks), desc="integrated gradients", leave=False) as bar:
        for rows, batch in iter_fact_batches_by_length(model, facts, batch_size):
            run = run_clean(model, batch, kind, hooks, metric, sae)
            replacements = replacement_activations(model, values, rows, run.activations, sae=sae)
            mask = position_mask(batch, positions)
            for name in hooks:
                clean, start = run.activations[name], replacements[name]
                path = _Path(name, clean, start, mask, run.residuals)
                grad_sum = _path_gradient_sum(model, batch, kind, path, metric, steps, max_rows, sae)
                product = (clean - start) * grad_sum / steps
                scores = reduce_to_components(product, mask, kind).float().cpu()
                totals[name] = add_padded(totals.get(name), scores)
                bar.update()
    return {name: totals[name] / len(facts) for name in hooks}


@dataclasses.dataclass(frozen=True)
class _Path:
    """The straight line from one hook's reference activation to its clean one, over one batch."""

    name: str
    clean: Tensor
    reference: Tensor
    mask: Tensor
    residuals: dict[int, Tensor]


def _path_gradient_sum(
    model: HookedTransformer,
    batch: FactBatch,
    kind: SiteKind,
    path_spec: _Path,
    metric: Metric,
    steps: int,
    max_rows: int,
    sae: FeatureSplice | None,
) -> Tensor:
    """Sum over the path points of the gradient of the summed metric at the interpolated activation."""
    name, clean, reference, mask = path_spec.name, path_spec.clean, path_spec.reference, path_spec.mask
    n_rows = len(batch)
    per_pass = max(1, max_rows // n_rows)
    alphas = (torch.arange(steps, dtype=clean.dtype, device=clean.device) + 0.5) / steps
    layer = layer_of(name)
    # Interpolate only where a site is ablated: at the masked positions (every position for residual sites).
    where = torch.ones_like(mask) if kind == "residual" else mask
    shape = (n_rows, clean.shape[1]) + (1,) * (clean.ndim - 2)
    where = where.view(shape).to(clean.dtype)
    total = torch.zeros_like(clean)
    for start in range(0, steps, per_pass):
        chunk = alphas[start : start + per_pass]
        copies = len(chunk)
        alpha = chunk.repeat_interleave(n_rows).view((copies * n_rows,) + (1,) * (clean.ndim - 1))
        difference = (clean - reference).repeat((copies,) + (1,) * (clean.ndim - 1))
        base = clean.repeat((copies,) + (1,) * (clean.ndim - 1))
        path = (base + where.repeat((copies,) + (1,) * (clean.ndim - 1)) * (alpha - 1.0) * difference).detach()
        path.requires_grad_(True)

        def replace(activation: Tensor, hook_name: str, path: Tensor = path) -> Tensor | None:
            return path if hook_name == name else None

        copies_batch = batch.repeat(copies)
        with torch.enable_grad(), model.hooks(fwd_hooks=component_hooks(kind, [name], replace, sae)):
            if layer is None:
                values = run_metric(model, copies_batch, metric)
            else:
                residual = path_spec.residuals[layer].repeat(copies, 1, 1)
                values = run_metric(model, copies_batch, metric, residual=residual, start_at_layer=layer)
            (grad,) = torch.autograd.grad(values.sum(), [path], allow_unused=True)
        if grad is not None:
            total += grad.view((copies, *clean.shape)).sum(0)
    return total


def ig_completeness(
    attribution: Attribution,
    model: HookedTransformer,
    domain: Domain,
    *,
    which: str = "forget",
    sae: FeatureSplice | None = None,
    reference_texts: Sequence[str] | None = None,
    batch_size: int = 8,
) -> dict[str, tuple[float, float]]:
    """Per hook: (sum of the scores, measured drop when the whole hook is at its reference).

    The two agree when ``steps`` is large enough, so a gap means ``steps`` should be raised. Pass the
    ``reference_texts`` the attribution used, if any.
    """
    from excise.locate.activation_patching import measure_hooks

    facts = domain.facts(which)  # type: ignore[arg-type]
    drops = measure_hooks(
        model,
        facts,
        list(attribution.scores),
        kind=attribution.kind,
        metric=attribution.metric,  # type: ignore[arg-type]
        reference=attribution.settings.get("reference", "zero"),
        positions=attribution.settings.get("positions", "all"),
        reference_texts=reference_texts,
        sae=sae,
        batch_size=batch_size,
        seed=attribution.settings.get("seed", 0),
    )
    return {hook: (float(attribution.set_scores[which][hook].sum()), drops[hook]) for hook in attribution.scores}
