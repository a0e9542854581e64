"""Figures of the deep-forgetting suite: attack curves per model, recovery per attack, probes and logit lens by layer.

Every function reads a :class:`~excise.verify.report.Report` filled by :func:`excise.verify.report.fill_report` and
returns None when the report lacks that data, so :func:`verify_figures` can offer whatever a run produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:
    from excise.verify.report import Report

MODEL_COLOURS = {"edited": "#d62728", "original": "#1f77b4", "twin": "#2ca02c"}


def plot_attack(report: Report, name: str) -> go.Figure | None:
    """Held-out forget accuracy of each model along one attack's axis (steps, k, format, layer or bit width)."""
    entry = report.attacks.get(name)
    if not entry or "curves" not in entry or "check" not in entry:
        return None
    figure = go.Figure()
    categorical = False
    for label, curve in entry["curves"].items():
        x = curve.get("steps", curve.get("x"))
        categorical = categorical or any(isinstance(value, str) for value in x)
        figure.add_scatter(
            x=x,
            y=curve["accuracy"],
            mode="lines+markers",
            name=label,
            line={"color": MODEL_COLOURS.get(label)},
        )
    if entry.get("chance") is not None:
        figure.add_hline(y=entry["chance"], line_dash="dot", annotation_text="chance")
    summary = entry.get("summary") or {}
    recovery = summary.get("recovery")
    subtitle = f" — recovery {recovery:.0%}" if isinstance(recovery, float) else ""
    figure.update_layout(
        title=f"{name} ({entry.get('form')} edit): held-out forget accuracy{subtitle}",
        xaxis_title=entry.get("x_title", ""),
        yaxis_title="held-out forget accuracy",
        yaxis_range=[0, 1.05],
    )
    if categorical:
        figure.update_xaxes(type="category")
    return figure


def plot_recovery(report: Report) -> go.Figure | None:
    """Recovery and residual of every attack as grouped bars; None without a suite run."""
    rows = report.verify.get("summary", {}).get("attacks", [])
    if not rows:
        return None
    attacks = [row["attack"] for row in rows]
    figure = go.Figure()
    for key, colour in (("recovery", "#d62728"), ("residual", "#9467bd")):
        figure.add_bar(name=key, x=attacks, y=[row.get(key) for row in rows], marker_color=colour)
    figure.update_layout(
        title="Recovery (share of removed accuracy brought back) and residual (above never-learned baseline)",
        yaxis_title="share",
        yaxis_range=[0, 1.05],
        barmode="group",
    )
    return figure


def plot_probes(report: Report) -> go.Figure | None:
    """Probe test accuracy by layer per model (solid) and the control task's (dotted)."""
    entry = report.attacks.get("probe")
    if not entry:
        return None
    figure = go.Figure()
    for label, result in entry["results"].items():
        colour = MODEL_COLOURS.get(label)
        figure.add_scatter(
            x=result["layers"], y=result["test_accuracy"], mode="lines+markers", name=label, line={"color": colour}
        )
        figure.add_scatter(
            x=result["layers"],
            y=result["control_test_accuracy"],
            mode="lines",
            name=f"{label} (control task)",
            line={"color": colour, "dash": "dot"},
        )
    if entry.get("chance") is not None:
        figure.add_hline(y=entry["chance"], line_dash="dot", annotation_text="chance")
    figure.update_layout(
        title="Linear probe: is the answer readable from the residual stream? (held-out facts)",
        xaxis_title="residual stream (0 = embedding)",
        yaxis_title="probe test accuracy",
        yaxis_range=[0, 1.05],
    )
    return figure


def plot_logit_lens(report: Report) -> go.Figure | None:
    """Median vocabulary rank of the target when each layer's residual stream is decoded, per model."""
    entry = report.attacks.get("logit_lens")
    if not entry:
        return None
    figure = go.Figure()
    for label, result in entry["results"].items():
        figure.add_scatter(
            x=result["layers"],
            y=[rank + 1 for rank in result["median_rank"]],
            mode="lines+markers",
            name=label,
            line={"color": MODEL_COLOURS.get(label)},
        )
    figure.update_layout(
        title="Logit lens: median rank of the target token by layer (1 = top)",
        xaxis_title="residual stream (0 = embedding)",
        yaxis_title="median rank + 1 (log scale)",
        yaxis_type="log",
    )
    return figure


def plot_behaviour(report: Report) -> go.Figure | None:
    """Accuracy by likelihood ranking and by greedy generation in chat format, per set and model."""
    behaviour = report.verify.get("behaviour")
    if not behaviour:
        return None
    figure = go.Figure()
    for label, per_set in behaviour.items():
        sets = [which for which in per_set if which != "generic_text"]
        for key, suffix, pattern in (("accuracy", "ranking", ""), ("generation_accuracy", "stated in chat", "/")):
            figure.add_bar(
                name=f"{label}: {suffix}",
                x=sets,
                y=[per_set[which].get(key) for which in sets],
                marker_color=MODEL_COLOURS.get(label),
                marker_pattern_shape=pattern,
            )
    figure.update_layout(
        title="Behaviour per fact set: likelihood ranking (solid) and greedy answers in chat format (hatched)",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
        barmode="group",
    )
    return figure


def verify_figures(report: Report) -> list[go.Figure]:
    """Every suite figure the report has data for, in reading order."""
    candidates = [plot_recovery(report), plot_behaviour(report)]
    candidates += [plot_attack(report, name) for name in report.attacks if name not in ("probe", "logit_lens")]
    candidates += [plot_probes(report), plot_logit_lens(report)]
    return [figure for figure in candidates if figure is not None]
