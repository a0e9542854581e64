"""Causal tracing: which hidden states, when restored, bring back a fact that corrupting its subject removed.

Meng et al., 2022 ("Locating and Editing Factual Associations in GPT", ROME) measure where a model recalls a fact
in three runs:

1. clean: the prompt as it is; the metric (by default the target's probability) is high;
2. corrupted: Gaussian noise is added to the token embeddings of the subject (``Fact.subject``), with a standard
   deviation of ``noise`` (3 in the paper) times the standard deviation of subject-token embeddings; the metric
   drops;
3. restored: the corrupted run, with one hidden state at one (layer, position) set back to its clean value.

A state whose restoration brings the metric back carries what the model needs to recall the fact. Three kinds of
state are traced: the residual stream after each block (``resid``: ``blocks.L.hook_resid_post``), and the outputs
of the MLP (``mlp``: ``hook_mlp_out``) and of attention (``attn``: ``hook_attn_out``). As in the paper, MLP and
attention outputs are restored over a window of ``window`` layers centred on the traced layer, since one layer's
output alone is often too small to matter. Every restoration uses the same noise draws, so cells of one grid
differ only by what is restored.

The paper's finding for GPT models: MLP outputs at the *last subject token* in middle layers restore the fact (the
site ROME edits), and attention matters at the last token in late layers.

Warning:
    Noise is drawn once per fact (``n_samples`` draws) from ``seed``. With few samples, grids are noisy; compare
    the corrupted baseline with the clean value before reading a grid: if corruption barely lowers the metric, no
    restoration can show anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.completions import tokenize_prompt
from excise.data.facts import Domain, Fact
from excise.locate.components import ForwardHooks
from excise.locate.metric import Metric, check_metric, make_fact_batch, metric_from_residual, run_metric

TraceKind = Literal["resid", "mlp", "attn"]
TRACE_KINDS: tuple[TraceKind, ...] = get_args(TraceKind)
#: Token categories of the paper's averaged figures, in order.
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
_HOOK = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@dataclasses.dataclass(frozen=True)
class FactTrace:
    """The causal trace of one fact.

    Attributes:
        fact_id: The fact's id.
        tokens: The prompt's tokens as text (with BOS where the model prepends it).
        subject_positions: Positions of the subject's tokens in ``tokens``.
        clean: The metric on the clean prompt.
        corrupted: The metric with the subject corrupted, averaged over the noise draws.
        grids: Per kind of state, the metric with the state at (layer, position) restored, averaged over the draws.
    """

    fact_id: str
    tokens: tuple[str, ...]
    subject_positions: tuple[int, ...]
    clean: float
    corrupted: float
    grids: dict[str, Float[Tensor, "layer pos"]]

    def indirect_effect(self, kind: TraceKind) -> Float[Tensor, "layer pos"]:
        """Restored metric minus the corrupted one: how much each state brings back."""
        return self.grids[kind] - self.corrupted

    def categories(self) -> list[str]:
        """Return the paper's token category of each prompt position."""
        first, last = self.subject_positions[0], self.subject_positions[-1]
        labels = []
        for position in range(len(self.tokens)):
            if position == len(self.tokens) - 1:
                labels.append(CATEGORIES[5])
            elif position == first:
                labels.append(CATEGORIES[0])
            elif position == last:
                labels.append(CATEGORIES[2])
            elif first < position < last:
                labels.append(CATEGORIES[1])
            elif position == last + 1:
                labels.append(CATEGORIES[3])
            elif position > last:
                labels.append(CATEGORIES[4])
            else:
                labels.append("before subject")
        return labels


@dataclasses.dataclass(frozen=True)
class CausalTrace:
    """Causal traces of several facts, with the settings that produced them.

    Attributes:
        traces: One :class:`FactTrace` per fact.
        metric: What the grids hold.
        kinds: The kinds of state traced.
        noise_std: Absolute standard deviation of the embedding noise.
        settings: ``noise`` (the multiplier), ``n_samples``, ``window`` and ``seed``.
    """

    traces: tuple[FactTrace, ...]
    metric: Metric
    kinds: tuple[TraceKind, ...]
    noise_std: float
    settings: dict[str, object]

    def by_category(self, kind: TraceKind) -> Float[Tensor, "layer category"]:
        """Mean indirect effect per layer and token category (:data:`CATEGORIES`), over facts; NaN where empty."""
        n_layers = next(iter(self.traces[0].grids.values())).shape[0]
        sums = torch.zeros(n_layers, len(CATEGORIES))
        counts = torch.zeros(len(CATEGORIES))
        for trace in self.traces:
            effect = trace.indirect_effect(kind)
            labels = trace.categories()
            for column, category in enumerate(CATEGORIES):
                positions = [p for p, label in enumerate(labels) if label == category]
                if positions:
                    sums[:, column] += effect[:, positions].mean(dim=1)
                    counts[column] += 1
        return sums / counts.where(counts > 0, torch.tensor(float("nan")))

    def to_frame(self) -> pd.DataFrame:
        """Return one row per fact: ``fact_id``, ``clean``, ``corrupted`` and, per kind, the best restored cell."""
        rows = []
        for trace in self.traces:
            row: dict[str, object] = {"fact_id": trace.fact_id, "clean": trace.clean, "corrupted": trace.corrupted}
            for kind, grid in trace.grids.items():
                layer, position = np.unravel_index(int(grid.argmax()), tuple(grid.shape))
                row[f"{kind}_best"] = float(grid.max())
                row[f"{kind}_best_layer"] = int(layer)
                row[f"{kind}_best_token"] = trace.tokens[int(position)]
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, index: int = 0):
        """Heatmaps of one fact's trace; see :func:`excise.plots.causal_tracing.plot_fact_trace`."""
        from excise.plots.causal_tracing import plot_fact_trace

        return plot_fact_trace(self, index)


def causal_tracing(
    model: HookedTransformer,
    facts: Domain | Sequence[Fact],
    *,
    which: str = "forget",
    kinds: Sequence[TraceKind] = TRACE_KINDS,
    metric: Metric = "target_prob",
    noise: float = 3.0,
    n_samples: int = 10,
    window: int = 10,
    max_rows: int = 512,
    seed: int = 0,
) -> CausalTrace:
    """Trace every fact: corrupt its subject, then restore each (layer, position) state of each kind.

    Args:
        model: Any HookedTransformer with a tokenizer; not changed.
        facts: Facts with a ``subject``, or a Domain (its ``which`` set is traced).
        which: The fact set of a Domain.
        kinds: ``"resid"``, ``"mlp"`` and/or ``"attn"``.
        metric: ``"target_prob"`` as in the paper, or another :mod:`excise.locate.metric` metric.
        noise: Noise standard deviation in units of the subject-token embeddings' standard deviation.
        n_samples: Noise draws per fact; each restored cell averages over them.
        window: Layers restored together for ``mlp`` and ``attn`` (1 restores a single layer).
        max_rows: Rows per forward pass (noise draws times restorations).
        seed: Seed of the noise.
    """
    check_metric(metric)
    fact_list = list(facts.facts(which)) if isinstance(facts, Domain) else list(facts)  # type: ignore[arg-type]
    if not fact_list:
        raise ValueError("no facts to trace; pass facts with a subject")
    for kind in kinds:
        if kind not in TRACE_KINDS:
            raise ValueError(f"kinds must be drawn from {TRACE_KINDS}, got {kind!r}")
    if not kinds:
        raise ValueError(f"kinds must name at least one of {TRACE_KINDS}")
    if n_samples < 1 or window < 1 or noise < 0:
        raise ValueError(f"need n_samples >= 1, window >= 1 and noise >= 0; got {n_samples}, {window}, {noise}")
    subjects = [subject_positions(model, fact) for fact in fact_list]
    noise_std = noise * _subject_embedding_std(model, fact_list, subjects)
    generator = torch.Generator().manual_seed(seed)
    traces = []
    for fact, positions in tqdm(list(zip(fact_list, subjects, strict=True)), desc="causal tracing", leave=False):
        traces.append(
            _trace_fact(model, fact, positions, tuple(kinds), metric, noise_std, n_samples, window, max_rows, generator)
        )
    return CausalTrace(
        traces=tuple(traces),
        metric=metric,
        kinds=tuple(kinds),
        noise_std=noise_std,
        settings={"noise": noise, "n_samples": n_samples, "window": window, "seed": seed},
    )


def subject_positions(model: HookedTransformer, fact: Fact) -> tuple[int, ...]:
    """Positions of the tokens of ``fact.subject`` in the tokenized prompt (BOS included when prepended)."""
    if not fact.subject:
        raise ValueError(f"fact {fact.id!r} has no subject; causal tracing corrupts the subject's tokens")
    start = fact.prompt.find(fact.subject)
    if start < 0:
        raise ValueError(f"subject {fact.subject!r} of fact {fact.id!r} does not occur in its prompt {fact.prompt!r}")
    end = start + len(fact.subject)
    ids = tokenize_prompt(model, fact.prompt)
    tokenizer = model.tokenizer
    assert tokenizer is not None  # tokenize_prompt checked it
    offset = len(ids) - len(tokenizer.encode(fact.prompt, add_special_tokens=False))
    text_ids = ids[offset:]
    positions = []
    for index in range(len(text_ids)):
        # Character span of token `index`, from the decoded prefixes (works for BPE and word-level tokenizers).
        left = len(str(tokenizer.decode(text_ids[:index])))
        right = len(str(tokenizer.decode(text_ids[: index + 1])))
        if left < end and right > start and str(tokenizer.decode(text_ids[index : index + 1])).strip():
            positions.append(index + offset)
    if not positions:
        raise ValueError(f"no token of fact {fact.id!r} covers its subject {fact.subject!r}")
    return tuple(positions)


def _subject_embedding_std(model: HookedTransformer, facts: list[Fact], subjects: list[tuple[int, ...]]) -> float:
    ids = [
        tokenize_prompt(model, fact.prompt)[p]
        for fact, positions in zip(facts, subjects, strict=True)
        for p in positions
    ]
    embeddings = model.W_E.detach()[torch.tensor(ids, device=model.W_E.device)]
    return float(embeddings.float().std()) if embeddings.numel() > 1 else float(model.W_E.detach().float().std())


@torch.no_grad()
def _trace_fact(
    model: HookedTransformer,
    fact: Fact,
    positions: tuple[int, ...],
    kinds: tuple[TraceKind, ...],
    metric: Metric,
    noise_std: float,
    n_samples: int,
    window: int,
    max_rows: int,
    generator: torch.Generator,
) -> FactTrace:
    batch = make_fact_batch(model, [fact])
    n_prompt = int(batch.completions.prompt_lengths[0])
    n_layers = model.cfg.n_layers
    subject = torch.tensor(positions, device=batch.tokens.device)
    noise = torch.randn(n_samples, len(positions), model.cfg.d_model, generator=generator) * noise_std
    noise = noise.to(device=batch.tokens.device, dtype=model.W_E.dtype)

    # Clean run: keep every state that a restoration writes back.
    clean_states: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: HookPoint) -> None:
        clean_states[hook.name] = activation[0].clone()  # type: ignore[index]

    names = [f"blocks.{layer}.{_HOOK[kind]}" for kind in kinds for layer in range(n_layers)]
    with model.hooks(fwd_hooks=[(name, keep) for name in names]):
        clean = float(run_metric(model, batch, metric)[0])

    # Corrupted runs (one row per noise draw): keep each block's input to restart restored runs from.
    samples = batch.repeat(n_samples)
    corrupted_inputs: dict[int, Tensor] = {}

    def corrupt(embedding: Tensor, hook: HookPoint) -> Tensor:
        embedding = embedding.clone()
        embedding[:, subject] += noise[: embedding.shape[0]]
        return embedding

    def keep_input(activation: Tensor, hook: HookPoint) -> None:
        corrupted_inputs[int((hook.name or "").split(".")[1])] = activation.clone()

    inputs = [(f"blocks.{layer}.hook_resid_pre", keep_input) for layer in range(n_layers)]
    with model.hooks(fwd_hooks=[("hook_embed", corrupt), *inputs]):
        corrupted = float(run_metric(model, samples, metric).mean())

    # Restorations: each (kind, layer, position) is one group of n_samples rows.
    configs: list[tuple[TraceKind, int, int]] = [
        (kind, layer, position) for kind in kinds for layer in range(n_layers) for position in range(n_prompt)
    ]
    grids = {kind: torch.zeros(n_layers, n_prompt) for kind in kinds}
    per_pass = max(1, max_rows // n_samples)
    for start in range(0, len(configs), per_pass):
        chunk = configs[start : start + per_pass]
        restores: dict[str, list[tuple[int, int]]] = {}
        for copy, (kind, layer, position) in enumerate(chunk):
            for restored_layer in _window(kind, layer, window, n_layers):
                restores.setdefault(f"blocks.{restored_layer}.{_HOOK[kind]}", []).append((copy, position))
        first_layer = min(int(name.split(".")[1]) for name in restores)
        copies = len(chunk)
        residual = corrupted_inputs[first_layer].repeat(copies, 1, 1)
        hooks: ForwardHooks = [
            (name, _restore_hook(pairs, clean_states[name], n_samples)) for name, pairs in restores.items()
        ]
        with model.hooks(fwd_hooks=hooks):
            final = model(residual, start_at_layer=first_layer, stop_at_layer=n_layers)
        values = metric_from_residual(model, final, samples.repeat(copies), metric).view(copies, n_samples).mean(1)
        for (kind, layer, position), value in zip(chunk, values.tolist(), strict=True):
            grids[kind][layer, position] = value

    tokenizer = model.tokenizer
    assert tokenizer is not None
    token_ids = batch.tokens[0, :n_prompt].tolist()
    tokens = tuple(str(tokenizer.decode([token_id])) for token_id in token_ids)
    return FactTrace(fact.id, tokens, positions, clean, corrupted, grids)


def _window(kind: TraceKind, layer: int, window: int, n_layers: int) -> list[int]:
    # As in the paper: layers [layer - window // 2, layer + ceil(window / 2)), cut at the first and last layer.
    if kind == "resid":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _restore_hook(pairs: list[tuple[int, int]], clean: Tensor, n_samples: int):
    rows = torch.tensor([copy * n_samples + s for copy, _ in pairs for s in range(n_samples)], device=clean.device)
    where = torch.tensor([position for _, position in pairs for _ in range(n_samples)], device=clean.device)

    def restore(activation: Tensor, hook: HookPoint) -> Tensor:
        activation[rows, where] = clean[where].to(activation.dtype)
        return activation

    return restore
