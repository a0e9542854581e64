"""Circuits: which connections between attention heads and MLPs carry a fact, by edge attribution patching.

The residual stream is a sum of the outputs of the components before it, so each component's input is a sum over
edges from every earlier component. Ablating one edge ``u -> v`` replaces ``u``'s contribution to ``v``'s input by
its reference value and leaves ``u``'s other edges alone. Edge attribution patching (EAP; Syed et al., 2023,
"Attribution Patching Outperforms Automated Circuit Discovery") estimates the metric's drop for every edge from
one forward and one backward pass:

    score(u -> v) = (a_u - a'_u) · ∂m/∂(input of v)

summed over positions and averaged over facts, with ``a_u`` the output of ``u`` and ``a'_u`` its reference (zero,
mean, or another fact's; :mod:`excise.locate.reference`). EAP-IG (Hanna et al., 2024, "Have Faith in
Faithfulness") averages the gradient over ``steps`` inputs interpolated between the reference embedding and the
real one, which is more faithful where the metric saturates.

Nodes that write: ``embed`` (the residual stream entering block 0), each attention head ``L{l}.H{h}`` (query head,
its output ``z_h W_O[h]``) and each MLP ``L{l}.MLP``. Inputs that read: each head's query input ``L{l}.H{h}.q``,
each key/value head's key and value inputs (``L{l}.KV{g}.k``/``.v`` in grouped-query models, where one key/value
input serves several query heads; ``L{l}.H{h}.k``/``.v`` otherwise), each MLP's input ``L{l}.MLP`` and the final
residual stream ``logits``.

A :class:`Circuit` holds every edge's score. :func:`circuit_faithfulness` runs the model with only the top edges
kept and every other edge at its reference, and reports how much of the clean metric the pruned circuit keeps.

Warning:
    The split query/key/value inputs that edges into heads need are switched on in the model's config for the
    duration of a call (``use_split_qkv_input``, ``use_hook_mlp_in``) and restored after, also after an error.
    Models with parallel attention and MLP (GPT-J style) are not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.data.facts import Domain, Fact
from excise.locate.components import ForwardHooks
from excise.locate.metric import FactBatch, Metric, check_metric, iter_fact_batches, run_metric
from excise.locate.reference import Reference, ReferenceValues, prepare_reference, replacement_activations

CircuitMethod = Literal["eap", "eap-ig"]
CIRCUIT_METHODS: tuple[CircuitMethod, ...] = get_args(CircuitMethod)


@dataclasses.dataclass(frozen=True)
class Circuit:
    """Edge scores between the components of a model.

    Attributes:
        upstream: Names of the writing nodes, in forward order.
        downstream: Names of the reading inputs, in forward order.
        scores: Estimated drop of the metric when the edge is ablated, ``upstream downstream``; 0 where no edge.
        allowed: Which (upstream, downstream) pairs are edges (the writer comes before the reader).
        method: ``"eap"`` or ``"eap-ig"``.
        metric: The metric explained.
        settings: Reference, steps, number of facts.
    """

    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    scores: Float[Tensor, "upstream downstream"]
    allowed: Bool[Tensor, "upstream downstream"]
    method: str
    metric: Metric
    settings: dict[str, object]

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    def top_edges(self, n: int, *, absolute: bool = True) -> Bool[Tensor, "upstream downstream"]:
        """Mask of the ``n`` edges with the largest score (largest absolute score with ``absolute=True``)."""
        if not 0 <= n <= self.n_edges:
            raise ValueError(f"n must be between 0 and the number of edges ({self.n_edges}), got {n}")
        values = self.scores.abs() if absolute else self.scores
        values = values.masked_fill(~self.allowed, float("-inf")).flatten()
        keep = torch.zeros(values.numel(), dtype=torch.bool)
        keep[torch.topk(values, n).indices] = True
        return keep.view_as(self.allowed)

    def edges(self) -> pd.DataFrame:
        """Return one row per edge (``upstream``, ``downstream``, ``score``), sorted by absolute score."""
        rows = torch.nonzero(self.allowed).tolist()
        frame = pd.DataFrame(
            {
                "upstream": [self.upstream[u] for u, _ in rows],
                "downstream": [self.downstream[d] for _, d in rows],
                "score": [float(self.scores[u, d]) for u, d in rows],
            }
        )
        order = frame["score"].abs().to_numpy().argsort(kind="stable")[::-1]
        return frame.iloc[order].reset_index(drop=True)

    def selectivity(self, kept: Circuit) -> Circuit:
        """Return a circuit whose scores are this one's minus ``kept``'s (scored on facts to keep, same model).

        Edges that every prompt relies on (for example a model's massive-activation pathway) score high on any fact
        set. The difference keeps the edges specific to this circuit's facts.
        """
        if kept.upstream != self.upstream or kept.downstream != self.downstream:
            raise ValueError("the two circuits were scored on models of different shapes; score both on one model")
        return dataclasses.replace(
            self,
            scores=self.scores - kept.scores,
            method=f"{self.method} (selectivity)",
            settings={**self.settings, "minus": dict(kept.settings)},
        )

    def plot(self, n: int = 30):
        """Plot the top ``n`` edges as a layered graph; see :func:`excise.plots.circuits.plot_circuit`."""
        from excise.plots.circuits import plot_circuit

        return plot_circuit(self, n)


@dataclasses.dataclass(frozen=True)
class _Graph:
    """Nodes, inputs and the hooks that read and write them, for one model."""

    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    allowed: Tensor
    n_layers: int
    n_heads: int
    n_kv: int
    grouped: bool

    @classmethod
    def of(cls, model: HookedTransformer) -> _Graph:
        cfg = model.cfg
        if cfg.parallel_attn_mlp or cfg.attn_only:
            raise ValueError("circuits need blocks with attention followed by an MLP; this model has another layout")
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        grouped = cfg.n_key_value_heads is not None and n_kv < cfg.n_heads
        upstream = ["embed"]
        downstream = []
        for layer in range(cfg.n_layers):
            upstream += [f"L{layer}.H{h}" for h in range(cfg.n_heads)] + [f"L{layer}.MLP"]
            downstream += [f"L{layer}.H{h}.q" for h in range(cfg.n_heads)]
            kv = "KV" if grouped else "H"
            downstream += [f"L{layer}.{kv}{g}.k" for g in range(n_kv)] + [f"L{layer}.{kv}{g}.v" for g in range(n_kv)]
            downstream += [f"L{layer}.MLP"]
        downstream.append("logits")
        allowed = torch.zeros(len(upstream), len(downstream), dtype=torch.bool)
        for d, reader in enumerate(downstream):
            reader_layer, reader_is_mlp = _position(reader, cfg.n_layers)
            for u, writer in enumerate(upstream):
                writer_layer, writer_is_mlp = _position(writer, cfg.n_layers)
                # Heads of layer l feed the MLP of layer l; anything else only feeds later layers.
                before = writer_layer < reader_layer or (
                    writer_layer == reader_layer and reader_is_mlp and not writer_is_mlp
                )
                allowed[u, d] = before
        return cls(tuple(upstream), tuple(downstream), allowed, cfg.n_layers, cfg.n_heads, n_kv, grouped)

    def reader_slices(self, layer: int) -> dict[str, tuple[int, int]]:
        """Per input hook of a layer, the [start, stop) range of its readers in ``downstream``."""
        start = layer * (self.n_heads + 2 * self.n_kv + 1)
        return {
            "q": (start, start + self.n_heads),
            "k": (start + self.n_heads, start + self.n_heads + self.n_kv),
            "v": (start + self.n_heads + self.n_kv, start + self.n_heads + 2 * self.n_kv),
            "mlp": (start + self.n_heads + 2 * self.n_kv, start + self.n_heads + 2 * self.n_kv + 1),
        }

    def writers_before(self, layer: int, *, include_heads_of_layer: bool) -> int:
        """Number of upstream nodes computed before a layer's attention (or MLP, with the layer's heads)."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if include_heads_of_layer else 0)


def _position(name: str, n_layers: int) -> tuple[float, bool]:
    if name == "embed":
        return -1, False
    if name == "logits":
        return n_layers, True
    layer = int(name.split(".")[0][1:])
    return layer, name.endswith("MLP")


def edge_attribution_patching(
    model: HookedTransformer,
    facts: Domain | Sequence[Fact],
    *,
    which: str = "forget",
    method: CircuitMethod = "eap",
    steps: int = 5,
    metric: Metric = "target_logprob",
    reference: Reference = "mean",
    reference_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> Circuit:
    """Score every edge between embedding, heads, MLPs and logits by EAP or EAP-IG.

    Args:
        model: Any HookedTransformer with a tokenizer; its config flags are restored afterwards.
        facts: Facts, or a Domain whose ``which`` set is used.
        which: Fact set of a Domain.
        method: ``"eap"`` (gradient at the clean input) or ``"eap-ig"`` (averaged over ``steps`` interpolated
            inputs).
        steps: Interpolation steps of EAP-IG (the paper uses 5).
        metric: See :mod:`excise.locate.metric`.
        reference: What an ablated edge carries: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference_texts: Texts for ``"mean"``; default the facts' prompts and targets.
        batch_size: Facts per batch.
        seed: Seed of the partner draw for ``"resample"``.
    """
    check_metric(metric)
    if method not in CIRCUIT_METHODS:
        raise ValueError(f"method must be one of {CIRCUIT_METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    fact_list = list(facts.facts(which)) if isinstance(facts, Domain) else list(facts)  # type: ignore[arg-type]
    if not fact_list:
        raise ValueError("no facts to score edges on; pass at least one Fact")
    graph = _Graph.of(model)
    values = _prepare_node_reference(model, reference, fact_list, reference_texts, batch_size, seed)
    total = torch.zeros(len(graph.upstream), len(graph.downstream))
    n_batches = -(-len(fact_list) // batch_size)
    with _split_inputs(model):
        for rows, batch in tqdm(
            iter_fact_batches(model, fact_list, batch_size),
            total=n_batches,
            desc=f"edge scores ({method})",
            leave=False,
        ):
            deltas = _node_deltas(model, graph, values, rows, batch)
            gradients = _reader_gradients(model, graph, batch, deltas, metric, method, steps)
            total += _edge_scores(graph, deltas, gradients)
    scores = (total / len(fact_list)).masked_fill(~graph.allowed, 0.0)
    return Circuit(
        upstream=graph.upstream,
        downstream=graph.downstream,
        scores=scores,
        allowed=graph.allowed,
        method=method,
        metric=metric,
        settings={"reference": reference, "steps": steps if method == "eap-ig" else 1, "n_facts": len(fact_list)},
    )


def circuit_faithfulness(
    circuit: Circuit,
    model: HookedTransformer,
    facts: Domain | Sequence[Fact],
    *,
    n_edges: Sequence[int],
    which: str = "forget",
    reference_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """Run the model with only the top ``n`` edges kept (every other edge at its reference), for each ``n``.

    Returns one row per ``n`` with ``metric`` (mean over facts) and ``faithfulness``: the share of the clean
    metric's distance from the empty circuit (every edge ablated) that the pruned circuit recovers; 1 is the full
    model, 0 the empty circuit. The reference is the one the circuit was scored with.
    """
    masks = {"clean": circuit.allowed, "empty": torch.zeros_like(circuit.allowed)}
    masks.update({str(n): circuit.top_edges(n) for n in n_edges})
    per_fact = _run_masks(circuit, model, facts, masks, which, reference_texts, batch_size, seed)
    means = {name: float(values.mean()) for name, values in per_fact.items()}
    span = means["clean"] - means["empty"]
    return pd.DataFrame(
        [
            {
                "n_edges": n,
                "metric": means[str(n)],
                "faithfulness": (means[str(n)] - means["empty"]) / span if span != 0 else float("nan"),
                "clean": means["clean"],
                "empty": means["empty"],
            }
            for n in n_edges
        ]
    )


def run_circuit(
    circuit: Circuit,
    model: HookedTransformer,
    facts: Domain | Sequence[Fact],
    keep: Bool[Tensor, "upstream downstream"],
    *,
    which: str = "forget",
    reference_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> Float[Tensor, " fact"]:
    """Compute the metric per fact with only the edges in ``keep`` intact and every other edge at its reference.

    An ablated edge ``u -> v`` feeds ``v`` the reference output of ``u`` while ``u``'s kept edges carry its
    output in this run. ``keep`` has the shape of ``circuit.allowed``; use :meth:`Circuit.top_edges` to build one.
    """
    if keep.shape != circuit.allowed.shape or keep.dtype != torch.bool:
        raise ValueError(
            f"keep must be a boolean mask of shape {tuple(circuit.allowed.shape)}, got {keep.dtype} {tuple(keep.shape)}"
        )
    return _run_masks(circuit, model, facts, {"keep": keep}, which, reference_texts, batch_size, seed)["keep"]


def _run_masks(
    circuit: Circuit,
    model: HookedTransformer,
    facts: Domain | Sequence[Fact],
    masks: dict[str, Tensor],
    which: str,
    reference_texts: Sequence[str] | None,
    batch_size: int,
    seed: int,
) -> dict[str, Tensor]:
    fact_list = list(facts.facts(which)) if isinstance(facts, Domain) else list(facts)  # type: ignore[arg-type]
    if not fact_list:
        raise ValueError("no facts to run the circuit on; pass at least one Fact")
    graph = _Graph.of(model)
    if graph.upstream != circuit.upstream or graph.downstream != circuit.downstream:
        raise ValueError("the circuit was scored on a model of another shape; score it on this model first")
    reference = str(circuit.settings.get("reference", "mean"))
    values = _prepare_node_reference(model, reference, fact_list, reference_texts, batch_size, seed)  # type: ignore[arg-type]
    out = {name: torch.zeros(len(fact_list)) for name in masks}
    with _split_inputs(model), torch.no_grad():
        for rows, batch in iter_fact_batches(model, fact_list, batch_size):
            deltas = _node_deltas(model, graph, values, rows, batch)
            for name, keep in masks.items():
                out[name][rows] = _run_pruned(model, graph, batch, deltas.reference, keep, circuit.metric).float().cpu()
    return out


def _run_pruned(
    model: HookedTransformer,
    graph: _Graph,
    batch: FactBatch,
    reference_outputs: dict[str, Tensor],
    keep: Bool[Tensor, "upstream downstream"],
    metric: Metric,
) -> Float[Tensor, " batch"]:
    """Compute the metric with every edge outside ``keep`` carrying its upstream node's reference output."""
    removed = (graph.allowed & ~keep).to(torch.float32)  # (upstream, downstream)
    w_o = {layer: model.blocks[layer].attn.W_O for layer in range(graph.n_layers)}
    # Node output minus reference output, in upstream order, filled in as the forward pass computes the nodes.
    buffer: list[Tensor] = []
    filled = [0]

    def write(values: Tensor) -> None:
        if not buffer:
            buffer.append(values.new_empty((len(graph.upstream), *values.shape[1:])))
        buffer[0][filled[0] : filled[0] + len(values)] = values
        filled[0] += len(values)

    def record_embed(activation: Tensor, hook: HookPoint) -> None:
        write((activation - reference_outputs["embed"]).unsqueeze(0))

    def record_heads(z: Tensor, hook: HookPoint) -> None:
        layer = int((hook.name or "").split(".")[1])
        write(torch.einsum("bphd,hdm->hbpm", z, w_o[layer]) - reference_outputs[f"heads.{layer}"])

    def record_mlp(activation: Tensor, hook: HookPoint) -> None:
        layer = int((hook.name or "").split(".")[1])
        write((activation - reference_outputs[f"mlp.{layer}"]).unsqueeze(0))

    def subtract(start: int, stop: int, with_head_dim: bool):
        weights_all = removed[:, start:stop]
        if not bool(weights_all.any()):
            return None  # every edge into these readers is kept

        def hook_fn(activation: Tensor, hook: HookPoint) -> Tensor:
            written = buffer[0][: filled[0]]  # (upstream so far, batch, pos, d_model)
            weights = weights_all[: filled[0]].to(written.dtype)
            correction = torch.einsum("ubpm,ur->bprm", written, weights)
            return activation - (correction if with_head_dim else correction[:, :, 0])

        return hook_fn

    fwd: list[tuple[str, Callable[..., Any] | None]] = [("blocks.0.hook_resid_pre", record_embed)]
    for layer in range(graph.n_layers):
        slices = graph.reader_slices(layer)
        fwd += [
            (f"blocks.{layer}.hook_q_input", subtract(*slices["q"], True)),
            (f"blocks.{layer}.hook_k_input", subtract(*slices["k"], True)),
            (f"blocks.{layer}.hook_v_input", subtract(*slices["v"], True)),
            (f"blocks.{layer}.attn.hook_z", record_heads),
            (f"blocks.{layer}.hook_mlp_in", subtract(*slices["mlp"], False)),
            (f"blocks.{layer}.hook_mlp_out", record_mlp),
        ]
    last = len(graph.downstream) - 1
    fwd.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", subtract(last, last + 1, False)))
    active: ForwardHooks = [(name, fn) for name, fn in fwd if fn is not None]
    with model.hooks(fwd_hooks=active):
        return run_metric(model, batch, metric)


@dataclasses.dataclass(frozen=True)
class _Deltas:
    """Per node, clean output minus reference output over one batch, and the reference outputs themselves."""

    delta: Float[Tensor, "upstream batch pos d_model"]
    reference: dict[str, Tensor]
    embed_clean: Tensor


def _node_hooks(graph: _Graph) -> list[str]:
    hooks = ["blocks.0.hook_resid_pre"]
    for layer in range(graph.n_layers):
        hooks += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
    return hooks


def _prepare_node_reference(
    model: HookedTransformer,
    reference: Reference,
    facts: list[Fact],
    reference_texts: Sequence[str] | None,
    batch_size: int,
    seed: int,
) -> ReferenceValues:
    # Node outputs are plain hook activations; "residual" makes the reference module treat them as such.
    hooks = _node_hooks(_Graph.of(model))
    return prepare_reference(
        model, reference, "residual", hooks, facts, reference_texts=reference_texts, batch_size=batch_size, seed=seed
    )


@torch.no_grad()
def _node_deltas(
    model: HookedTransformer, graph: _Graph, values: ReferenceValues, rows: slice, batch: FactBatch
) -> _Deltas:
    hooks = _node_hooks(graph)
    store: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: HookPoint) -> None:
        store[hook.name] = activation.detach().clone()  # type: ignore[index]

    with model.hooks(fwd_hooks=[(name, keep) for name in hooks]):
        model(batch.tokens, stop_at_layer=model.cfg.n_layers)
    replacements = replacement_activations(model, values, rows, store)
    reference: dict[str, Tensor] = {"embed": replacements["blocks.0.hook_resid_pre"]}
    deltas = [store["blocks.0.hook_resid_pre"] - reference["embed"]]
    for layer in range(graph.n_layers):
        w_o = model.blocks[layer].attn.W_O
        clean_heads = torch.einsum("bphd,hdm->hbpm", store[f"blocks.{layer}.attn.hook_z"], w_o)
        reference_heads = torch.einsum("bphd,hdm->hbpm", replacements[f"blocks.{layer}.attn.hook_z"], w_o)
        reference[f"heads.{layer}"] = reference_heads
        reference[f"mlp.{layer}"] = replacements[f"blocks.{layer}.hook_mlp_out"]
        deltas.extend(clean_heads - reference_heads)
        deltas.append(store[f"blocks.{layer}.hook_mlp_out"] - reference[f"mlp.{layer}"])
    return _Deltas(torch.stack(deltas), reference, store["blocks.0.hook_resid_pre"])


def _reader_gradients(
    model: HookedTransformer,
    graph: _Graph,
    batch: FactBatch,
    deltas: _Deltas,
    metric: Metric,
    method: CircuitMethod,
    steps: int,
) -> Float[Tensor, "downstream batch pos d_model"]:
    """Gradient of the summed metric with respect to every reader's input (averaged over the path for EAP-IG)."""
    alphas = [1.0] if method == "eap" else [(k + 0.5) / steps for k in range(steps)]
    reference_embed = deltas.reference["embed"]
    total: Tensor | None = None
    for alpha in alphas:
        inputs: dict[str, Tensor] = {}

        def start(activation: Tensor, hook: HookPoint, alpha: float = alpha) -> Tensor:
            # The path runs from the reference embedding (alpha = 0) to the real one (alpha = 1).
            return (reference_embed + alpha * (deltas.embed_clean - reference_embed)).detach().requires_grad_(True)

        def keep(activation: Tensor, hook: HookPoint, inputs: dict[str, Tensor] = inputs) -> None:
            inputs[hook.name] = activation  # type: ignore[index]

        readers = [f"blocks.{layer}.{name}" for layer in range(graph.n_layers) for name in _READERS]
        final = f"blocks.{graph.n_layers - 1}.hook_resid_post"
        fwd: ForwardHooks = [("blocks.0.hook_resid_pre", start), *[(name, keep) for name in [*readers, final]]]
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
            values = run_metric(model, batch, metric)
            names = [*readers, final]
            grads = torch.autograd.grad(values.sum(), [inputs[name] for name in names], allow_unused=True)
        flat = []
        for name, grad in zip(names, grads, strict=True):
            grad = torch.zeros_like(inputs[name]) if grad is None else grad.detach()
            flat.extend(grad.unbind(2) if grad.ndim == 4 else [grad])
        stacked = torch.stack(flat)
        total = stacked if total is None else total + stacked
    assert total is not None
    return total / len(alphas)


_READERS = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")


def _edge_scores(graph: _Graph, deltas: _Deltas, gradients: Tensor) -> Float[Tensor, "upstream downstream"]:
    # score[u, d] = sum over batch and positions of delta_u · grad_d (padding positions have zero gradient).
    return torch.einsum("ubpm,dbpm->ud", deltas.delta.float(), gradients.float()).cpu()


@contextlib.contextmanager
def _split_inputs(model: HookedTransformer) -> Iterator[None]:
    """Switch on per-head query/key/value inputs and the MLP input hook; restore the config afterwards."""
    before = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before[0])
        model.set_use_hook_mlp_in(before[1])
