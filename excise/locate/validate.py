"""Validate an attribution: compare its scores with the measured effect of ablating the same sites.

Every locate method other than activation patching estimates. Before an edit is built on a ranking, the ranking
should predict what ablation actually does. :func:`validate` takes the top-``k`` sites of an attribution and a
random sample of the rest, measures each site's real ablation effect with batched activation patching (same
metric, reference value and positions as the estimate), and reports per fact set and for the ranking score:

- ``spearman``: rank correlation of estimate and measurement; what matters for choosing top sites.
- ``pearson``: linear correlation; high when the estimate is right up to scale.
- ``mae`` and ``rmse``: absolute error of the estimate, in metric units (nats for ``target_logprob``).
- ``bias``: mean of estimate minus measurement; positive when the method overstates effects.
- ``top_hit_rate``: share of the top-``k`` estimated sites that are also in the top-``k`` measured among the
  validated sites.

The random sample matters: on top sites alone correlations are computed over a narrow range and look worse than
the ranking is, and an estimate that only gets the top right can still mislead on the rest.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from excise.data.facts import Domain
from excise.locate.activation_patching import measure_sites
from excise.locate.attribution import Attribution
from excise.locate.components import FeatureSplice
from excise.locate.metric import METRICS
from excise.sites import Site

SUMMARY_COLUMNS = ["method", "kind", "set", "n", "spearman", "pearson", "mae", "rmse", "bias", "top_hit_rate"]


@dataclasses.dataclass(frozen=True)
class Validation:
    """Estimated versus measured ablation effects of sampled sites.

    Attributes:
        method: The attribution's method.
        kind: Kind of the sites.
        table: One row per site and score: ``label``, ``hook``, ``layer``, ``index``, ``sample`` (``"top"`` or
            ``"random"``), ``set`` (a fact set or ``"ranking"``), ``estimate`` and ``actual``.
        summary: One row per ``set`` with the columns of :data:`SUMMARY_COLUMNS`.
        settings: How the effects were measured.
    """

    method: str
    kind: str
    table: pd.DataFrame
    summary: pd.DataFrame
    settings: dict[str, Any]

    def plot(self):
        """Scatter of estimate against measured effect; see :func:`excise.plots.attribution.plot_validation`."""
        from excise.plots.attribution import plot_validation

        return plot_validation([self])


def validate(
    attribution: Attribution,
    model: HookedTransformer,
    domain: Domain,
    *,
    k: int = 20,
    n_random: int = 20,
    sets: Sequence[str] | None = None,
    sae: FeatureSplice | None = None,
    reference_texts: Sequence[str] | None = None,
    batch_size: int = 16,
    max_rows: int = 512,
    seed: int = 0,
) -> Validation:
    """Measure the real ablation effect of the top-``k`` and ``n_random`` other sites and compare.

    The metric, reference value and positions are read from the attribution, so the measurement ablates the way
    the estimate assumed.

    Args:
        attribution: Scores to check.
        model: The model the attribution was computed on.
        domain: The facts it was computed on.
        k: Top sites by the ranking score.
        n_random: Sites drawn uniformly from the rest.
        sets: Fact sets to measure; default the attribution's scored sets.
        sae: The SAE, for ``sae_feature`` attributions.
        reference_texts: The texts the attribution's ``"mean"`` reference was computed on, if not the default
            (each set's own prompts and targets).
        batch_size: Facts per batch.
        max_rows: Rows per forward pass of activation patching.
        seed: Seed of the random sample (and of the resample partners).
    """
    if attribution.metric not in METRICS:
        raise ValueError(
            f"validate compares estimated ablation effects with measured ones, but this {attribution.method} "
            f"attribution scores {attribution.metric!r}; validate an attribution of one of the metrics {METRICS}"
        )
    if k < 0 or n_random < 0 or k + n_random == 0:
        raise ValueError(f"k and n_random must be >= 0 and not both 0, got k={k}, n_random={n_random}")
    k = min(k, attribution.n_sites)
    chosen_sets = list(sets) if sets is not None else list(attribution.set_scores)
    if not chosen_sets:
        raise ValueError("the attribution has no per-set scores; pass sets=[...] to measure")
    for which in chosen_sets:
        if which not in attribution.set_scores:
            raise KeyError(f"the attribution has no scores for set {which!r}; it has {sorted(attribution.set_scores)}")
    settings = _measure_settings(attribution)

    top = attribution.top(k)
    top_keys = set(top)
    rest = [site for site in attribution.sites() if site not in top_keys]
    sample = random.Random(seed).sample(rest, min(n_random, len(rest)))
    sites: list[Site] = [*top, *sample]
    labels = ["top"] * len(top) + ["random"] * len(sample)

    actual: dict[str, np.ndarray] = {}
    for which in chosen_sets:
        effects = measure_sites(
            model,
            domain.facts(which),  # type: ignore[arg-type]
            sites,
            sae=sae,
            reference_texts=reference_texts,
            batch_size=batch_size,
            max_rows=max_rows,
            seed=seed,
            description=f"validating ({which})",
            **settings,
        )
        actual[which] = effects.mean().numpy()

    rows = []
    ranking = str(attribution.settings.get("ranking", ""))
    for which in chosen_sets:
        estimates = [float(attribution.set_scores[which][s.hook][s.index]) for s in sites]
        rows.append(_rows(sites, labels, which, estimates, actual[which]))
    ranking_actual = _ranking_actual(ranking, actual)
    if ranking_actual is not None:
        estimates = [float(attribution.scores[s.hook][s.index]) for s in sites]
        rows.append(_rows(sites, labels, "ranking", estimates, ranking_actual))
    table = pd.concat(rows, ignore_index=True)
    summary = pd.DataFrame(
        [
            _summary(attribution.method, attribution.kind, str(which), part, k)
            for which, part in table.groupby("set", sort=False)
        ],
        columns=SUMMARY_COLUMNS,
    )
    return Validation(
        method=attribution.method,
        kind=attribution.kind,
        table=table,
        summary=summary,
        settings={**settings, "k": k, "n_random": len(sample), "seed": seed, "ranking": ranking},
    )


def compare(validations: Sequence[Validation]) -> pd.DataFrame:
    """Stack the summaries of several validations in one table, for comparing methods."""
    if not validations:
        raise ValueError("pass at least one Validation to compare")
    return pd.concat([v.summary for v in validations], ignore_index=True)


def _measure_settings(attribution: Attribution) -> dict[str, Any]:
    settings = attribution.settings
    # Older attributions store the reference as "ablation".
    reference = settings.get("reference", settings.get("ablation", "zero"))
    return {"metric": attribution.metric, "reference": reference, "positions": settings.get("positions", "all")}


def _ranking_actual(ranking: str, actual: dict[str, np.ndarray]) -> np.ndarray | None:
    if " - " in ranking:
        first, second = ranking.split(" - ", 1)
        if first in actual and second in actual:
            return actual[first] - actual[second]
        return None
    return actual.get(ranking)


def _rows(sites: list[Site], labels: list[str], which: str, estimates: list[float], actual: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": [site.label() for site in sites],
            "hook": [site.hook for site in sites],
            "layer": [site.layer for site in sites],
            "index": [site.index for site in sites],
            "sample": labels,
            "set": which,
            "estimate": estimates,
            "actual": actual,
        }
    )


def _summary(method: str, kind: str, which: str, part: pd.DataFrame, k: int) -> dict[str, Any]:
    estimate = part["estimate"].to_numpy(dtype=float)
    actual = part["actual"].to_numpy(dtype=float)
    error = estimate - actual
    top_n = min(k, len(part))
    hit_rate = float("nan")
    if top_n > 0:
        by_estimate = set(np.argsort(-estimate, kind="stable")[:top_n])
        by_actual = set(np.argsort(-actual, kind="stable")[:top_n])
        hit_rate = len(by_estimate & by_actual) / top_n
    return {
        "method": method,
        "kind": kind,
        "set": which,
        "n": len(part),
        "spearman": _correlation(pd.Series(estimate).rank().to_numpy(), pd.Series(actual).rank().to_numpy()),
        "pearson": _correlation(estimate, actual),
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "bias": float(error.mean()),
        "top_hit_rate": hit_rate,
    }


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
