"""Activation patching: the measured effect of ablating each site, many sites per forward pass.

For each site and fact, the site's activation is replaced by a reference value: zero, a mean, or another fact's
value (see :mod:`excise.locate.reference`). The drop of the metric is then measured (Vig et al., 2020, "Causal
Mediation Analysis for Interpreting Neural NLP"; Meng et al., 2022; Zhang and Nanda, 2024, "Towards Best Practices
of Activation Patching"). It is the ground truth that gradient estimates such as attribution patching approximate,
and the check that :func:`excise.locate.validate.validate` runs.

A plain implementation runs one forward pass per site. Here each forward pass measures many sites at once: the
batch of facts is stacked once per site, and a hook overwrites site ``s`` only in copy ``s``. Sites are grouped by
layer, and each group starts from the cached clean residual stream at its layer instead of from the tokens (nothing
before the site changes), and only the positions the metric reads are unembedded. Results equal the plain loop
(``strategy="loop"``) up to float rounding.

Warning:
    Cost grows with the number of sites times the number of facts. Measure every site of a small model or a
    chosen subset of a large one (the top sites of an estimate plus a random sample, as ``validate`` does).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Literal, get_args

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from excise.data.facts import Domain, Fact
from excise.locate.attribution import Attribution, rank_by_selectivity, resolve_sets
from excise.locate.components import (
    CleanRun,
    FeatureSplice,
    check_hooks,
    component_hooks,
    default_hooks,
    layer_of,
    pad_to_common_width,
    run_clean,
)
from excise.locate.metric import (
    FactBatch,
    Metric,
    check_metric,
    iter_fact_batches,
    iter_fact_batches_by_length,
    metric_from_residual,
    run_metric,
)
from excise.locate.reference import Reference, ReferenceValues, prepare_reference, replacement_activations
from excise.sites import Site, SiteKind, component_size

Positions = Literal["all", "last"]
POSITIONS: tuple[Positions, ...] = get_args(Positions)
Strategy = Literal["batched", "loop"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


@dataclasses.dataclass(frozen=True)
class SiteEffects:
    """Measured ablation effects of a list of sites on a list of facts.

    Attributes:
        sites: The sites, in the order of ``drops``' rows.
        drops: Metric on the clean model minus metric with the site ablated, per site and fact.
        baseline: The clean metric per fact.
        metric: What was measured.
        reference: What each site was set to.
        positions: ``"all"``: ablated at every position; ``"last"``: at the last prompt position only.
    """

    sites: tuple[Site, ...]
    drops: Float[Tensor, "site fact"]
    baseline: Float[Tensor, " fact"]
    metric: Metric
    reference: Reference
    positions: Positions

    def mean(self) -> Float[Tensor, " site"]:
        """Mean drop per site over the facts."""
        return self.drops.mean(dim=1)

    def to_frame(self) -> pd.DataFrame:
        """Return one row per site: ``hook``, ``layer``, ``index``, ``label`` and the mean ``drop``."""
        return pd.DataFrame(
            {
                "hook": [site.hook for site in self.sites],
                "layer": [site.layer for site in self.sites],
                "index": [site.index for site in self.sites],
                "label": [site.label() for site in self.sites],
                "drop": self.mean().numpy(),
            }
        )


def activation_patching(
    model: HookedTransformer,
    domain: Domain,
    *,
    kind: SiteKind = "neuron",
    hooks: Sequence[str] | None = None,
    sets: Sequence[str] | None = None,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    positions: Positions = "all",
    sae: FeatureSplice | None = None,
    batch_size: int = 16,
    max_rows: int = 512,
    seed: int = 0,
) -> Attribution:
    """Measure the ablation effect of every site of ``kind`` on ``hooks`` for each fact set.

    The ranking score is the selectivity ``forget - retain``; see
    :func:`excise.locate.attribution.rank_by_selectivity`.

    Args:
        model: Any HookedTransformer with a tokenizer; not changed.
        domain: Facts to measure.
        kind: ``"neuron"``, ``"head"``, ``"residual"`` (index = token position) or ``"sae_feature"``.
        hooks: Hooks to measure; default every hook of the kind (:func:`excise.locate.components.default_hooks`).
        sets: Fact sets; default every non-empty set of the domain.
        metric: See :mod:`excise.locate.metric`.
        reference: ``"zero"``, ``"mean"`` or ``"resample"``; see :mod:`excise.locate.reference`.
        reference_texts: Texts for the mean; default each set's own prompts and targets.
        positions: ``"all"`` ablates every position (as a weight edit does), ``"last"`` the last prompt position.
            Ignored for residual sites, whose index is the position.
        sae: The SAE for ``sae_feature`` sites.
        batch_size: Facts per batch.
        max_rows: Rows per forward pass (facts times sites measured together); bounds memory.
        seed: Seed of the partner draw for ``"resample"``.
    """
    hook_list = list(hooks) if hooks is not None else default_hooks(model, kind, sae)
    check_hooks(model, kind, hook_list, sae)
    set_names = resolve_sets(domain, sets)
    set_scores: dict[str, dict[str, Tensor]] = {}
    for which in set_names:
        facts = domain.facts(which)  # type: ignore[arg-type]
        sites = _all_sites(model, kind, hook_list, facts, sae)
        effects = measure_sites(
            model,
            facts,
            sites,
            metric=metric,
            reference=reference,
            reference_texts=reference_texts,
            positions=positions,
            sae=sae,
            batch_size=batch_size,
            max_rows=max_rows,
            seed=seed,
            description=f"activation patching ({which})",
        )
        set_scores[which] = _per_hook(effects, hook_list)
    set_scores = pad_to_common_width(set_scores) if kind == "residual" else set_scores
    scores, ranking = rank_by_selectivity(set_scores)
    return Attribution(
        method="activation_patching",
        metric=metric,
        kind=kind,
        scores=scores,
        set_scores=set_scores,
        settings={
            "reference": reference,
            "positions": positions,
            "ranking": ranking,
            "n_facts": {which: len(domain.facts(which)) for which in set_names},  # type: ignore[arg-type]
            "seed": seed,
        },
        sae_id=sae.sae_id if kind == "sae_feature" and sae is not None else None,
    )


def measure_sites(
    model: HookedTransformer,
    facts: Sequence[Fact],
    sites: Sequence[Site],
    *,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    positions: Positions = "all",
    sae: FeatureSplice | None = None,
    batch_size: int = 16,
    max_rows: int = 512,
    strategy: Strategy = "batched",
    seed: int = 0,
    description: str = "activation patching",
) -> SiteEffects:
    """Ablate each site on its own and measure the drop of ``metric`` on every fact.

    Args:
        model: Any HookedTransformer with a tokenizer; not changed.
        facts: Facts to measure on.
        sites: Sites of one kind, each ablated alone.
        metric: See :mod:`excise.locate.metric`.
        reference: What a site is set to; see :mod:`excise.locate.reference`.
        reference_texts: Texts for ``"mean"``; default the facts' prompts and targets.
        positions: ``"all"`` or ``"last"`` (the last prompt position); ignored for residual sites.
        sae: The SAE for ``sae_feature`` sites.
        batch_size: Facts per batch.
        max_rows: Rows per forward pass with ``"batched"``: ``max_rows // batch_size`` sites are measured at once.
        strategy: ``"batched"`` (many sites per pass, from the site's layer on) or ``"loop"`` (one full forward pass
            per site, the plain reference implementation).
        seed: Seed of the partner draw for ``"resample"``.
        description: Label of the progress bar.
    """
    check_metric(metric)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if not sites:
        raise ValueError("no sites to measure; pass at least one Site")
    if not facts:
        raise ValueError("no facts to measure on; pass at least one Fact")
    kinds = {site.kind for site in sites}
    if len(kinds) != 1:
        raise ValueError(f"sites must all be of one kind, got {sorted(kinds)}; measure each kind separately")
    kind: SiteKind = sites[0].kind
    hooks = list(dict.fromkeys(site.hook for site in sites))
    check_hooks(model, kind, hooks, sae)
    if kind == "sae_feature" and sae is not None and any(site.sae_id != sae.sae_id for site in sites):
        raise ValueError(f"sae_feature sites must name the SAE passed as sae= ({sae.sae_id!r})")
    values = prepare_reference(
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

    drops = torch.zeros(len(sites), len(facts))
    baseline = torch.zeros(len(facts))
    n_batches = -(-len(facts) // batch_size)
    with (
        torch.no_grad(),
        tqdm(total=n_batches * len(sites), desc=description, unit="site", leave=False, disable=None) as bar,
    ):
        for rows, batch in iter_fact_batches_by_length(model, facts, batch_size):
            run = _batch_runner(model, batch, rows, values, kind, hooks, metric, positions, sae)
            columns = torch.tensor(rows)
            baseline[columns] = run.baseline.float().cpu()
            if strategy == "loop":
                for index, site in enumerate(sites):
                    drops[index, columns] = (run.baseline - run.loop_one(site)).float().cpu()
                    bar.update()
                continue
            for indices, change in run.batched(sites, max_rows):
                drops[torch.tensor(indices).unsqueeze(1), columns.unsqueeze(0)] = change.float().cpu()
                bar.update(len(indices))
    return SiteEffects(tuple(sites), drops, baseline, metric, reference, positions)


@dataclasses.dataclass
class _BatchRunner:
    """Patched forward passes over one batch of facts, sharing its clean run."""

    model: HookedTransformer
    batch: FactBatch
    kind: SiteKind
    metric: Metric
    positions: Positions
    sae: FeatureSplice | None
    clean: CleanRun
    replacements: dict[str, Tensor]

    @property
    def baseline(self) -> Tensor:
        return self.clean.baseline

    def loop_one(self, site: Site) -> Float[Tensor, " batch"]:
        """Full forward pass from the tokens with one site ablated in every row."""
        rows = torch.arange(len(self.batch), device=self.batch.tokens.device)
        patch = self._patch_fn({site.hook: (rows, rows, torch.full_like(rows, site.index))}, 0)
        with self.model.hooks(fwd_hooks=self._hooks([site.hook], patch)):
            logits = self.model(self.batch.tokens)
        return self.batch.metric_from_logits(logits, self.metric)

    def batched(self, sites: Sequence[Site], max_rows: int) -> Iterator[tuple[list[int], Tensor]]:
        """Yield ``(site indices, drop of the metric per site and row)``, ``max_rows // len(batch)`` sites per pass.

        With ``positions="last"`` each pass computes only the positions from the earliest last prompt token on and
        reads the clean keys and values of earlier positions: a patch there cannot reach them (attention is causal).
        """
        device = self.batch.tokens.device
        suffix = self.positions == "last" and self.kind != "residual"
        # Positions before the earliest last prompt token are the same in every copy; a suffix pass skips them.
        first = int(self.batch.completions.last_prompt_positions.min()) if suffix else 0
        n_rows = len(self.batch)
        for start_layer, indices in _chunks(sites, max(1, max_rows // n_rows)):
            specs: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for copy, index in enumerate(indices):
                specs[sites[index].hook].append((copy, sites[index].index))
            patch_specs = {}
            for hook, pairs in specs.items():
                copies = torch.tensor([c for c, _ in pairs], device=device).repeat_interleave(n_rows)
                base_rows = torch.arange(n_rows, device=device).repeat(len(pairs))
                components = torch.tensor([i for _, i in pairs], device=device).repeat_interleave(n_rows)
                patch_specs[hook] = (copies * n_rows + base_rows, base_rows, components)
            n_copies = len(indices)
            copies_batch = self.batch.repeat(n_copies)
            with self.model.hooks(fwd_hooks=self._hooks(list(specs), self._patch_fn(patch_specs, first))):
                if start_layer is None:
                    values = run_metric(self.model, copies_batch, self.metric)
                elif suffix:
                    values = self._run_suffix(copies_batch, first, start_layer, n_copies)
                else:
                    residual = self.clean.residuals[start_layer].repeat(n_copies, 1, 1)
                    values = run_metric(
                        self.model, copies_batch, self.metric, residual=residual, start_at_layer=start_layer
                    )
            yield indices, self.baseline.unsqueeze(0) - values.view(n_copies, n_rows)

    def _run_suffix(self, copies_batch: FactBatch, first: int, start_layer: int, copies: int) -> Tensor:
        # Positions [first, end) are recomputed; earlier ones are read from the clean keys and values.
        end = int((copies_batch.completions.prompt_lengths + copies_batch.completions.completion_lengths).max()) - 1
        end = max(end, first + 1)
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.cfg.device, len(copies_batch))
        for layer in range(start_layer, self.model.cfg.n_layers):
            entry = cache.entries[layer]
            entry.past_keys = self.clean.keys[layer][:, :first].repeat(copies, 1, 1, 1)
            entry.past_values = self.clean.values[layer][:, :first].repeat(copies, 1, 1, 1)
        cache.freeze()
        residual = self.clean.residuals[start_layer][:, first:end].repeat(copies, 1, 1)
        final = self.model(
            residual, start_at_layer=start_layer, stop_at_layer=self.model.cfg.n_layers, past_kv_cache=cache
        )
        return metric_from_residual(self.model, final, copies_batch, self.metric, first_position=first)

    def _hooks(self, hooks: list[str], patch):
        return component_hooks(self.kind, hooks, patch, self.sae)

    def _patch_fn(self, specs: dict[str, tuple[Tensor, Tensor, Tensor]], first: int):
        """Build a patch that writes the reference values of ``specs``' sites into their copies of the batch.

        ``first`` is the token position of the activation's first column (a suffix pass starts after 0).
        """
        last = self.batch.completions.last_prompt_positions
        width = self.batch.width

        def patch(activation: Tensor, name: str) -> Tensor | None:
            if name not in specs:
                return None
            patched_rows, base_rows, components = specs[name]
            source = self.replacements[name]
            if self.kind == "residual":
                keep = components < width  # positions past the batch's width do not exist in it
                activation[patched_rows[keep], components[keep]] = source[base_rows[keep], components[keep]]
            elif self.positions == "all":
                activation[patched_rows, :, components] = source[base_rows, :, components]
            else:
                where = last[base_rows]
                activation[patched_rows, where - first, components] = source[base_rows, where, components]
            return activation

        return patch


def _batch_runner(
    model: HookedTransformer,
    batch: FactBatch,
    rows: slice | list[int],
    values: ReferenceValues,
    kind: SiteKind,
    hooks: list[str],
    metric: Metric,
    positions: Positions,
    sae: FeatureSplice | None,
) -> _BatchRunner:
    suffix = positions == "last" and kind != "residual"
    clean = run_clean(model, batch, kind, hooks, metric, sae, keys_values=suffix)
    replacements = replacement_activations(model, values, rows, clean.activations, sae=sae)
    return _BatchRunner(model, batch, kind, metric, positions, sae, clean, replacements)


def _chunks(sites: Sequence[Site], per_pass: int) -> Iterator[tuple[int | None, list[int]]]:
    """Cut the sites, in layer order, into chunks of ``per_pass``; each chunk starts at its earliest layer.

    A chunk that spans layers recomputes the blocks between its first and last layer for the later sites, which
    costs less than a forward pass per layer when few sites share a layer.
    """
    order = sorted(range(len(sites)), key=lambda i: -1 if (layer := layer_of(sites[i].hook)) is None else layer)
    for start in range(0, len(order), per_pass):
        indices = order[start : start + per_pass]
        layers = [layer_of(sites[i].hook) for i in indices]
        yield (None if any(layer is None for layer in layers) else min(layers)), indices  # type: ignore[type-var]


def _all_sites(
    model: HookedTransformer, kind: SiteKind, hooks: Sequence[str], facts: Sequence[Fact], sae: FeatureSplice | None
) -> list[Site]:
    if kind == "sae_feature":
        splice = sae
        assert splice is not None  # checked by check_hooks
        return [Site(hook, i, kind, splice.sae_id) for hook in hooks for i in range(splice.d_sae)]
    if kind == "residual":
        from excise.locate.metric import make_fact_batch

        width = make_fact_batch(model, facts).width
        return [Site(hook, position, kind) for hook in hooks for position in range(width)]
    size = component_size(model, kind)
    assert size is not None  # neurons and heads have a fixed count
    return [Site(hook, i, kind) for hook in hooks for i in range(size)]


def _per_hook(effects: SiteEffects, hooks: Sequence[str]) -> dict[str, Tensor]:
    means = effects.mean()
    grouped: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for site, value in zip(effects.sites, means.tolist(), strict=True):
        grouped[site.hook].append((site.index, value))
    out = {}
    for hook in hooks:
        pairs = sorted(grouped[hook])
        out[hook] = torch.tensor([value for _, value in pairs])
    return out


def measure_hooks(
    model: HookedTransformer,
    facts: Sequence[Fact],
    hooks: Sequence[str],
    *,
    kind: SiteKind,
    metric: Metric = "target_logprob",
    reference: Reference = "zero",
    reference_texts: Sequence[str] | None = None,
    positions: Positions = "all",
    sae: FeatureSplice | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Mean drop of ``metric`` when every component of a hook is ablated at once, per hook.

    One forward pass per hook and batch. Checks the completeness of integrated gradients and measures whole
    layers.
    """
    check_metric(metric)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    check_hooks(model, kind, hooks, sae)
    values = prepare_reference(
        model, reference, kind, hooks, facts, reference_texts=reference_texts, sae=sae, batch_size=batch_size, seed=seed
    )
    totals = dict.fromkeys(hooks, 0.0)
    with torch.no_grad():
        for rows, batch in iter_fact_batches(model, facts, batch_size):
            run = _batch_runner(model, batch, rows, values, kind, list(hooks), metric, positions, sae)
            where = _ablated_positions(batch, kind, positions)
            for name in hooks:
                patch = _whole_hook_patch(name, run.replacements[name], where)
                with model.hooks(fwd_hooks=component_hooks(kind, [name], patch, sae)):
                    patched = run_metric(model, batch, metric)
                totals[name] += float((run.baseline - patched).sum())
    return {name: total / len(facts) for name, total in totals.items()}


def _ablated_positions(batch: FactBatch, kind: SiteKind, positions: Positions) -> Tensor:
    # Boolean (batch, pos): every position, or each row's last prompt position. Residual sites name positions.
    if kind == "residual" or positions == "all":
        return torch.ones(batch.tokens.shape, dtype=torch.bool, device=batch.tokens.device)
    where = torch.zeros(batch.tokens.shape, dtype=torch.bool, device=batch.tokens.device)
    where[torch.arange(len(batch)), batch.completions.last_prompt_positions] = True
    return where


def _whole_hook_patch(name: str, source: Tensor, where: Tensor):
    def patch(activation: Tensor, hook_name: str) -> Tensor | None:
        if hook_name != name:
            return None
        activation[where] = source[where]
        return activation

    return patch
