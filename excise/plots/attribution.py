"""Figures of an Attribution: where the scores sit (layers, neurons, heads, positions) and how well they predict.

Every function takes the result object and returns a ``plotly.graph_objects.Figure``; nothing is shown or saved.
``which`` selects the ranking score (None) or one fact set's scores (``"forget"``, ``"retain"``, ``"neighbour"``).
Scores follow :class:`excise.locate.Attribution`'s convention: the drop of the metric when the site is ablated, so
positive (red) supports the metric and negative (blue) opposes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from excise.locate.attribution import Attribution

if TYPE_CHECKING:
    from excise.locate.validate import Validation

_DIVERGING = "RdBu_r"


def plot_layer_totals(attribution: Attribution, which: str | None = None, *, absolute: bool = False) -> go.Figure:
    """Bar per layer: the sum of the scores of its sites (of absolute scores with ``absolute=True``)."""
    totals = attribution.layer_totals(which, absolute=absolute)
    label = _score_label(attribution, which)
    figure = go.Figure(
        go.Bar(
            x=[str(layer) for layer in totals.index],
            y=totals.to_numpy(),
            hovertemplate="layer %{x}: %{y:.4g}<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"{attribution.method}: {'|' + label + '|' if absolute else label} per layer ({attribution.kind} sites)",
        xaxis_title="layer",
        yaxis_title=f"sum of {label}",
    )
    return figure


def plot_score_map(attribution: Attribution, which: str | None = None, *, max_columns: int = 4096) -> go.Figure:
    """Heatmap of every score: one row per hook (layer), one column per component (neuron, head, feature, position).

    Hover shows the site label, the score and each fact set's score. Hooks with fewer components are padded with
    blank cells. Up to ``max_columns`` components per row are drawn.
    """
    hooks = list(attribution.scores)
    source = attribution.scores if which is None else attribution.set_scores.get(which)
    if source is None:
        raise KeyError(f"no scores for set {which!r}; this attribution has {sorted(attribution.set_scores)}")
    width = min(max_columns, max(values.numel() for values in source.values()))
    grid = np.full((len(hooks), width), np.nan)
    for row, hook in enumerate(hooks):
        values = source[hook].detach().float().cpu().numpy()[:width]
        grid[row, : len(values)] = values
    sets = list(attribution.set_scores)
    extra = np.full((len(hooks), width, len(sets)), np.nan)
    for position, name in enumerate(sets):
        for row, hook in enumerate(hooks):
            values = attribution.set_scores[name][hook].detach().float().cpu().numpy()[:width]
            extra[row, : len(values), position] = values
    set_hover = "".join(f"<br>{name}: %{{customdata[{i}]:.4g}}" for i, name in enumerate(sets))
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    component = {"neuron": "neuron", "head": "head", "sae_feature": "feature", "residual": "position"}[attribution.kind]
    figure = go.Figure(
        go.Heatmap(
            z=grid,
            x=list(range(width)),
            y=[_hook_label(hook) for hook in hooks],
            customdata=extra,
            colorscale=_DIVERGING,
            zmid=0.0,
            zmin=-limit,
            zmax=limit,
            colorbar={"title": _score_label(attribution, which)},
            hovertemplate=f"%{{y}} {component} %{{x}}<br>score: %{{z:.4g}}{set_hover}<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"{attribution.method}: {_score_label(attribution, which)} per {component}",
        xaxis_title=component,
        yaxis_title="hook",
        yaxis_autorange="reversed",
    )
    return figure


def plot_neuron_map(attribution: Attribution, which: str | None = None) -> go.Figure:
    """Layer x neuron heatmap of a neuron attribution, with hover; see :func:`plot_score_map`."""
    _require_kind(attribution, "neuron")
    return plot_score_map(attribution, which)


def plot_head_grid(
    attribution: Attribution, which: str | None = None, *, n_key_value_heads: int | None = None
) -> go.Figure:
    """Layer x head heatmap of a head attribution, each cell annotated with its score.

    With ``n_key_value_heads`` (grouped-query models), hover names each query head's key/value head; the scores
    stay per query head.
    """
    _require_kind(attribution, "head")
    figure = plot_score_map(attribution, which)
    n_heads = max(values.numel() for values in attribution.scores.values())
    heatmap = figure.data[0]
    grid = np.asarray(heatmap.z, dtype=float)  # type: ignore[attr-defined]
    text = [["" if np.isnan(value) else f"{value:.2g}" for value in row] for row in grid]
    heatmap.update(text=text, texttemplate="%{text}")  # type: ignore[attr-defined]
    if n_key_value_heads:
        per_group = n_heads // n_key_value_heads
        groups = [f"query head {h} (key/value head {h // per_group})" for h in range(n_heads)]
        heatmap.update(x=groups)  # type: ignore[attr-defined]
    figure.update_layout(xaxis_title="query head")
    return figure


def plot_selectivity(attribution: Attribution, against: str = "retain", *, top: int = 20) -> go.Figure:
    """Scatter of every site's forget score against its score on a kept set; the ``top`` sites are labelled.

    Sites above the diagonal matter more for the forget set: good targets. Sites far right and far up matter for
    both: ablating them damages kept knowledge too.
    """
    frame = attribution.to_frame()
    if "forget" not in frame or against not in frame:
        sets = sorted(attribution.set_scores)
        raise KeyError(f"needs 'forget' and {against!r} set scores; this attribution has {sets}")
    frame = frame.assign(selectivity=frame["forget"] - frame[against])
    best = frame.nlargest(min(top, len(frame)), "selectivity")
    figure = go.Figure()
    figure.add_scatter(
        x=frame[against],
        y=frame["forget"],
        mode="markers",
        marker={"size": 4, "color": frame["selectivity"], "colorscale": _DIVERGING, "cmid": 0.0},
        text=frame["label"],
        name="sites",
        hovertemplate=f"%{{text}}<br>forget %{{y:.4g}}<br>{against} %{{x:.4g}}<extra></extra>",
    )
    figure.add_scatter(
        x=best[against],
        y=best["forget"],
        mode="markers+text",
        text=best["label"],
        textposition="top center",
        marker={"size": 8, "symbol": "circle-open", "color": "black"},
        name=f"top {len(best)} by selectivity",
    )
    both = np.concatenate([frame["forget"].to_numpy(dtype=float), frame[against].to_numpy(dtype=float)])
    low, high = float(both.min()), float(both.max())
    figure.add_scatter(x=[low, high], y=[low, high], mode="lines", line={"dash": "dot", "color": "grey"}, name="equal")
    figure.update_layout(
        title=f"{attribution.method}: forget vs {against} score per {attribution.kind}",
        xaxis_title=f"{against} score",
        yaxis_title="forget score",
    )
    return figure


def plot_validation(validations: Sequence[Validation], which: str = "ranking") -> go.Figure:
    """Method comparison: estimated score against measured ablation effect, one colour per method.

    Points on the dotted diagonal are estimated exactly. The legend gives each method's Spearman and Pearson
    correlation on ``which`` (a fact set or ``"ranking"``).
    """
    if not validations:
        raise ValueError("pass at least one Validation to plot")
    figure = go.Figure()
    lows, highs = [], []
    for validation in validations:
        part = validation.table[validation.table["set"] == which]
        if part.empty:
            available = sorted(set(validation.table["set"]))
            raise KeyError(f"validation of {validation.method} has no rows for set {which!r}; it has {available}")
        summary = validation.summary[validation.summary["set"] == which].iloc[0]
        name = f"{validation.method} ({validation.kind}): ρ={summary['spearman']:.2f}, r={summary['pearson']:.2f}"
        figure.add_scatter(
            x=part["actual"],
            y=part["estimate"],
            mode="markers",
            name=name,
            text=part["label"] + " (" + part["sample"] + ")",
            marker={"symbol": [("circle" if s == "top" else "x") for s in part["sample"]]},
            hovertemplate="%{text}<br>measured %{x:.4g}<br>estimated %{y:.4g}<extra></extra>",
        )
        both = np.concatenate([np.asarray(part["actual"], dtype=float), np.asarray(part["estimate"], dtype=float)])
        lows.append(float(both.min()))
        highs.append(float(both.max()))
    low, high = min(lows), max(highs)
    figure.add_scatter(x=[low, high], y=[low, high], mode="lines", line={"dash": "dot", "color": "grey"}, name="exact")
    figure.update_layout(
        title=f"Estimated vs measured ablation effect ({which}); circles: top sites, crosses: random sites",
        xaxis_title="measured drop (activation patching)",
        yaxis_title="estimated drop",
    )
    return figure


def plot_top_sites(attribution: Attribution, k: int = 20, which: str | None = None) -> go.Figure:
    """Horizontal bars of the ``k`` highest-scoring sites, with each fact set's score as its own bar."""
    sites = attribution.top(k, by=which)
    labels = [site.label() for site in sites]
    figure = go.Figure()
    series = {"score": attribution.scores} if which is None else {}
    series.update(attribution.set_scores)
    for name, per_hook in series.items():
        figure.add_bar(
            y=labels,
            x=[float(per_hook[site.hook][site.index]) for site in sites],
            name=name,
            orientation="h",
        )
    figure.update_layout(
        title=f"{attribution.method}: top {len(sites)} {attribution.kind} sites by {_score_label(attribution, which)}",
        barmode="group",
        yaxis_autorange="reversed",
        xaxis_title=f"drop of {attribution.metric} when ablated",
    )
    return figure


def _score_label(attribution: Attribution, which: str | None) -> str:
    if which is not None:
        return f"{which} score"
    ranking = attribution.settings.get("ranking")
    return f"score ({ranking})" if ranking else "score"


def _hook_label(hook: str) -> str:
    parts = hook.split(".")
    return f"L{parts[1]} {parts[-1]}" if len(parts) > 2 and parts[0] == "blocks" else hook


def _require_kind(attribution: Attribution, kind: str) -> None:
    if attribution.kind != kind:
        raise ValueError(f"this plot needs a {kind} attribution, got kind {attribution.kind!r}; use plot_score_map")
