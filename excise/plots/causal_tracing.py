"""Figures of a causal trace: restored metric per (layer, token), one heatmap per kind of state.

Laid out as in Meng et al. (2022): tokens down, layers across, subject tokens marked with ``*``, one panel each for
the residual stream, MLP outputs and attention outputs. Colour runs from the corrupted baseline (white) to the
clean value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from excise.locate.causal_tracing import CausalTrace

_TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}
_COLOURS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def plot_fact_trace(trace: CausalTrace, index: int = 0) -> go.Figure:
    """Plot one fact's restored-metric grids, one panel per traced kind of state."""
    if not 0 <= index < len(trace.traces):
        raise IndexError(f"index {index} is out of range; the trace has {len(trace.traces)} facts")
    fact = trace.traces[index]
    labels = [f"{token}*" if p in fact.subject_positions else token for p, token in enumerate(fact.tokens)]
    labels = [f"{p}: {label}" for p, label in enumerate(labels)]  # positions keep repeated tokens apart
    kinds = list(fact.grids)
    figure = make_subplots(rows=1, cols=len(kinds), subplot_titles=[_TITLES[k] for k in kinds], shared_yaxes=True)
    for column, kind in enumerate(kinds, start=1):
        grid = fact.grids[kind].numpy().T  # (pos, layer)
        figure.add_trace(
            go.Heatmap(
                z=grid,
                x=list(range(grid.shape[1])),
                y=labels,
                zmin=min(fact.corrupted, float(grid.min())),
                zmax=max(fact.clean, float(grid.max())),
                colorscale=_COLOURS[kind],
                showscale=column == len(kinds),
                colorbar={"title": trace.metric},
                hovertemplate=f"{_TITLES[kind]} restored at layer %{{x}}, token %{{y}}<br>{trace.metric}: %{{z:.4g}}"
                "<extra></extra>",
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(
        title=(
            f"Causal trace of {fact.fact_id}: {trace.metric} clean {fact.clean:.3g}, subject corrupted "
            f"{fact.corrupted:.3g} (noise std {trace.noise_std:.3g}, {trace.settings['n_samples']} draws, "
            f"window {trace.settings['window']})"
        )
    )
    return figure


def plot_trace_summary(trace: CausalTrace) -> go.Figure:
    """Mean indirect effect per token category and layer over all facts, one panel per kind (the paper's Fig. 1)."""
    from excise.locate.causal_tracing import CATEGORIES

    kinds = list(trace.kinds)
    figure = make_subplots(rows=1, cols=len(kinds), subplot_titles=[_TITLES[k] for k in kinds], shared_yaxes=True)
    for column, kind in enumerate(kinds, start=1):
        grid = trace.by_category(kind).numpy().T  # (category, layer)
        finite = grid[np.isfinite(grid)]
        limit = float(np.abs(finite).max()) if finite.size else 1.0
        figure.add_trace(
            go.Heatmap(
                z=grid,
                x=list(range(grid.shape[1])),
                y=list(CATEGORIES),
                zmin=0.0,
                zmax=limit,
                colorscale=_COLOURS[kind],
                showscale=column == len(kinds),
                colorbar={"title": "indirect effect"},
                hovertemplate="layer %{x}, %{y}<br>mean indirect effect %{z:.4g}<extra></extra>",
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(
        title=f"Causal tracing, mean over {len(trace.traces)} facts: {trace.metric} restored minus corrupted"
    )
    return figure
