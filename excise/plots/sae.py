"""Figures of SAE features: the top features of an attribution as bars, with the contexts where each fires.

Hovering a bar shows the feature's top-activating corpus snippets (from :func:`excise.locate.sae.top_contexts`),
with the token where it fires marked ``[[like this]]``.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from excise.locate.attribution import Attribution


def plot_feature_bars(attribution: Attribution, contexts: pd.DataFrame | None = None, k: int = 15) -> go.Figure:
    """Horizontal bars of the ``k`` top features by the ranking score, one bar per fact set's score too.

    Args:
        attribution: An attribution over ``sae_feature`` sites (e.g. from :func:`excise.locate.sae.
            feature_frequencies` or attribution patching with ``sae=``).
        contexts: Optional :func:`excise.locate.sae.top_contexts` output; its snippets are shown on hover.
        k: Number of features.
    """
    if attribution.kind != "sae_feature":
        raise ValueError(f"plot_feature_bars needs an sae_feature attribution, got kind {attribution.kind!r}")
    sites = attribution.top(min(k, attribution.n_sites))
    labels = [f"F{site.index}" for site in sites]
    hover = [_contexts_of(contexts, site.index) for site in sites]
    figure = go.Figure()
    series = {"score": attribution.scores, **attribution.set_scores}
    for name, per_hook in series.items():
        figure.add_bar(
            y=labels,
            x=[float(per_hook[site.hook][site.index]) for site in sites],
            name=name,
            orientation="h",
            customdata=hover,
            hovertemplate="%{y}: %{x:.4g}<br>%{customdata}<extra>" + name + "</extra>",
        )
    figure.update_layout(
        title=f"Top {len(sites)} SAE features by {attribution.settings.get('ranking', 'score')} ({attribution.method})",
        barmode="group",
        yaxis_autorange="reversed",
        xaxis_title=attribution.metric,
        hoverlabel={"align": "left"},
    )
    return figure


def _contexts_of(contexts: pd.DataFrame | None, feature: int) -> str:
    if contexts is None or contexts.empty:
        return ""
    rows = contexts[contexts["feature"] == feature]
    pairs = sorted(zip(rows["rank"], rows["activation"], rows["context"], strict=True))
    lines = [f"{activation:.3g}: {html.escape(str(context))}" for _, activation, context in pairs]
    return "<br>".join(lines) if lines else "(no contexts)"
