"""Figures of a Report: accuracy before and after per fact set, relearning curves, the trade-off over k.

The deep-forgetting suite's figures live in :mod:`excise.plots.verify` and are appended by :func:`report_figures`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:
    from excise.verify.report import Report

SET_ORDER = ("forget", "neighbour", "retain")


def plot_accuracy(report: Report) -> go.Figure:
    """Grouped bars: accuracy per fact set for each model state, with chance as a dotted line."""
    figure = go.Figure()
    for state, per_set in report.metrics.items():
        sets = [which for which in SET_ORDER if which in per_set]
        figure.add_bar(
            name=state,
            x=sets,
            y=[per_set[which]["accuracy"] for which in sets],
            customdata=[per_set[which]["n"] for which in sets],
            hovertemplate="%{x}: %{y:.1%} of %{customdata} facts<extra>" + state + "</extra>",
        )
    chances = [entry.get("chance") for per_set in report.metrics.values() for entry in per_set.values()]
    chances = [c for c in chances if c is not None]
    if chances:
        figure.add_hline(y=sum(chances) / len(chances), line_dash="dot", annotation_text="chance")
    figure.update_layout(
        title="Accuracy by likelihood ranking", yaxis_title="accuracy", yaxis_range=[0, 1.05], barmode="group"
    )
    return figure


def plot_relearning(report: Report, attack: str = "relearn") -> go.Figure | None:
    """Held-out forget accuracy per finetuning step, one line per model; None without that attack."""
    entry = report.attacks.get(attack)
    if not entry:
        return None
    figure = go.Figure()
    for label, curve in entry["curves"].items():
        figure.add_scatter(x=curve["steps"], y=curve["accuracy"], mode="lines+markers", name=label)
    settings = entry.get("settings", {})
    figure.update_layout(
        title=(
            f"Relearning attack: held-out forget accuracy (lr {settings.get('lr')}, batch {settings.get('batch_size')})"
        ),
        xaxis_title="finetuning step",
        yaxis_title="held-out forget accuracy",
        yaxis_range=[0, 1.05],
    )
    return figure


def plot_tradeoff(report: Report) -> go.Figure | None:
    """Accuracy per fact set against the number of ablated sites; None without a sweep."""
    sweep = report.extra.get("sweep")
    if not sweep:
        return None
    figure = go.Figure()
    for which in SET_ORDER:
        if which in sweep["accuracy"]:
            figure.add_scatter(x=sweep["k"], y=sweep["accuracy"][which], mode="lines+markers", name=which)
    figure.update_layout(
        title="Trade-off: accuracy against the number of ablated sites (held-out facts)",
        xaxis_title="k (sites ablated)",
        xaxis_type="log",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
    )
    return figure


def plot_layer_scores(report: Report) -> go.Figure | None:
    """Per-layer totals of the attribution scores kept in the report; None without them."""
    per_layer = report.locate.get("layer_totals")
    if not per_layer:
        return None
    figure = go.Figure()
    for which, totals in per_layer.items():
        layers = sorted(totals, key=int)
        figure.add_bar(name=which, x=[int(layer) for layer in layers], y=[totals[layer] for layer in layers])
    figure.update_layout(
        title=f"Attribution by layer ({report.locate.get('method')}, {report.locate.get('kind')} sites)",
        xaxis_title="layer",
        yaxis_title="summed score (drop in target log-prob)",
        barmode="group",
    )
    return figure


def report_figures(report: Report) -> list[go.Figure]:
    """Every figure the report has data for, in reading order."""
    candidates = [
        plot_layer_scores(report),
        plot_accuracy(report),
        plot_tradeoff(report),
        plot_relearning(report),
    ]
    from excise.plots.verify import verify_figures

    return [figure for figure in candidates if figure is not None] + verify_figures(report)
