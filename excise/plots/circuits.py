"""Figures of a circuit: the top edges as a layered graph, and faithfulness against the number of edges kept.

In the graph, layers run left to right (embedding first, logits last); attention heads sit in a column per layer
and the MLP above them. An edge into a head's query, key or value input ends at that head (a key/value input of a
grouped-query model ends at the middle of the query heads that share it). Red edges support the metric (ablating
them lowers it), blue edges oppose it; width grows with the absolute score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go

if TYPE_CHECKING:
    from excise.locate.circuits import Circuit


def plot_circuit(circuit: Circuit, n: int = 30) -> go.Figure:
    """Plot the ``n`` edges with the largest absolute score, as a layered graph with hover on edges and nodes."""
    keep = circuit.top_edges(min(n, circuit.n_edges))
    shape = _shape(circuit)
    pairs = keep.nonzero().tolist()
    largest = max((abs(float(circuit.scores[u, d])) for u, d in pairs), default=1.0) or 1.0
    figure = go.Figure()
    nodes: dict[str, tuple[float, float]] = {}
    for u, d in pairs:
        writer, reader = circuit.upstream[u], circuit.downstream[d]
        start, end = _place(writer, shape), _place(reader, shape)
        nodes[writer] = start
        nodes[_node_of(reader)] = end
        score = float(circuit.scores[u, d])
        figure.add_scatter(
            x=[start[0], end[0]],
            y=[start[1], end[1]],
            mode="lines",
            line={"width": 1 + 7 * abs(score) / largest, "color": "firebrick" if score > 0 else "royalblue"},
            opacity=0.7,
            hoverinfo="text",
            text=f"{writer} → {reader}: {score:.4g}",
            showlegend=False,
        )
    names = list(nodes)
    figure.add_scatter(
        x=[nodes[name][0] for name in names],
        y=[nodes[name][1] for name in names],
        mode="markers+text",
        text=names,
        textposition="top center",
        marker={"size": 10, "color": "black"},
        hoverinfo="text",
        showlegend=False,
    )
    figure.update_layout(
        title=(
            f"Top {len(pairs)} edges ({circuit.method}, {circuit.metric}, "
            f"reference {circuit.settings.get('reference')})"
        ),
        xaxis={"title": "layer (embedding at -1, logits last)", "zeroline": False},
        yaxis={"title": "head (MLP on top)", "zeroline": False},
        plot_bgcolor="white",
    )
    return figure


def plot_faithfulness(frame: pd.DataFrame) -> go.Figure:
    """Faithfulness against the number of edges kept, from :func:`excise.locate.circuits.circuit_faithfulness`."""
    figure = go.Figure(
        go.Scatter(
            x=frame["n_edges"],
            y=frame["faithfulness"],
            mode="lines+markers",
            hovertemplate="%{x} edges: %{y:.3f}<extra></extra>",
        )
    )
    figure.add_hline(y=1.0, line_dash="dot", annotation_text="full model")
    figure.add_hline(y=0.0, line_dash="dot", annotation_text="every edge ablated")
    figure.update_layout(
        title="Circuit faithfulness: share of the clean metric kept by the top edges",
        xaxis_title="edges kept",
        xaxis_type="log",
        yaxis_title="faithfulness",
    )
    return figure


def _shape(circuit: Circuit) -> tuple[int, int, int]:
    """Number of layers, query heads per layer and query heads per key/value head, read from the node names."""
    n_layers = sum(1 for name in circuit.upstream if name.endswith(".MLP"))
    n_heads = sum(1 for name in circuit.upstream if name.startswith("L0.H"))
    n_kv = sum(1 for name in circuit.downstream if name.startswith("L0.KV") and name.endswith(".k"))
    return n_layers, n_heads, n_heads // n_kv if n_kv else 1


def _node_of(reader: str) -> str:
    # "L3.H2.q" -> "L3.H2", "L3.KV1.k" -> "L3.KV1"; "L3.MLP" and "logits" stay.
    return reader.rsplit(".", 1)[0] if reader.endswith((".q", ".k", ".v")) else reader


def _place(name: str, shape: tuple[int, int, int]) -> tuple[float, float]:
    n_layers, n_heads, per_group = shape
    name = _node_of(name)
    middle = (n_heads - 1) / 2
    if name == "embed":
        return -1.0, middle
    if name == "logits":
        return float(n_layers), middle
    layer_text, part = name.split(".", 1)
    layer = float(layer_text[1:])
    if part == "MLP":
        return layer + 0.3, float(n_heads)
    if part.startswith("KV"):
        group = int(part[2:])
        return layer - 0.15, group * per_group + (per_group - 1) / 2
    return layer, float(part[1:])
