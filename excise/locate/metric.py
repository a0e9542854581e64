"""The quantity every locate method explains: how strongly the model predicts each fact's target.

A locate method scores a site by how much a metric drops when the site is ablated. The metric is computed per fact
from the logits at the positions that predict the target:

- ``"target_logprob"``: summed log-probability of the target's tokens after the prompt, in nats. Smooth and
  additive over tokens; the default.
- ``"target_prob"``: probability of the whole target, ``exp(target_logprob)``. Bounded in [0, 1], as in causal
  tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT"), but flat where the model is
  already sure or already wrong, so gradients there are small.
- ``"logit_diff"``: logit of the target's first token minus the mean logit of the distractors' first tokens, at
  the last prompt position. The usual metric of circuit discovery (Wang et al., 2022); it ignores how the rest of
  the vocabulary moves.

Only the positions that the metric reads are unembedded (:func:`metric_from_residual`). The unembedding is a large
share of a small model's compute (for SmolLM2-135M about a fifth per token), so methods that run many patched
forward passes stop at the final residual stream and finish here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.completions import CompletionBatch, make_batch, tokenize_completion, tokenize_prompt
from excise.data.facts import Fact

Metric = Literal["target_logprob", "target_prob", "logit_diff"]
METRICS: tuple[Metric, ...] = get_args(Metric)


def check_metric(metric: str) -> None:
    """Raise ValueError unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


@dataclasses.dataclass(frozen=True)
class FactBatch:
    """Facts tokenized as right-padded prompt + target rows, with what each metric needs.

    Attributes:
        completions: Prompt and target tokens; see :class:`excise.completions.CompletionBatch`.
        distractor_ids: First token of each distractor, padded with -1 where a fact has fewer distractors.
    """

    completions: CompletionBatch
    distractor_ids: Int[Tensor, "batch distractor"]

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def tokens(self) -> Int[Tensor, "batch pos"]:
        return self.completions.tokens

    @property
    def width(self) -> int:
        return self.completions.tokens.shape[1]

    def select(self, rows: Tensor) -> FactBatch:
        """Return the batch restricted to ``rows`` (a 1-D index tensor), in that order."""
        batch = self.completions
        return FactBatch(
            CompletionBatch(batch.tokens[rows], batch.prompt_lengths[rows], batch.completion_lengths[rows]),
            self.distractor_ids[rows],
        )

    def repeat(self, copies: int) -> FactBatch:
        """Return the batch stacked ``copies`` times along the batch axis (copy-major: row ``c * len(self) + b``)."""
        batch = self.completions
        return FactBatch(
            CompletionBatch(
                batch.tokens.repeat(copies, 1),
                batch.prompt_lengths.repeat(copies),
                batch.completion_lengths.repeat(copies),
            ),
            self.distractor_ids.repeat(copies, 1),
        )

    def readout(self, metric: Metric) -> tuple[Int[Tensor, "batch readout"], Float[Tensor, "batch readout"]]:
        """Positions whose logits ``metric`` reads, and a 0/1 mask of which are real.

        ``target_logprob`` and ``target_prob`` read every position that predicts a target token;
        ``logit_diff`` reads only the last prompt position.
        """
        batch = self.completions
        start = batch.last_prompt_positions.unsqueeze(1)
        if metric == "logit_diff":
            return start, torch.ones_like(start, dtype=torch.float32)
        offsets = torch.arange(int(batch.completion_lengths.max()), device=start.device).unsqueeze(0)
        mask = (offsets < batch.completion_lengths.unsqueeze(1)).float()
        positions = (start + offsets).clamp(max=self.width - 1)
        return positions, mask

    def metric_from_readout(
        self, logits: Float[Tensor, "batch readout d_vocab"], metric: Metric
    ) -> Float[Tensor, " batch"]:
        """Compute the metric per row from the logits at :meth:`readout` positions. Differentiable in ``logits``."""
        positions, mask = self.readout(metric)
        rows = torch.arange(len(self), device=logits.device)
        if metric == "logit_diff":
            first = logits[:, 0]
            target = first[rows, self.tokens[rows, positions[:, 0] + 1]]
            valid = self.distractor_ids >= 0
            if not bool(valid.any(dim=1).all()):
                raise ValueError("metric 'logit_diff' needs at least one distractor per fact; use 'target_logprob'")
            distractor_logits = first.gather(1, self.distractor_ids.clamp(min=0))
            mean_distractor = (distractor_logits * valid).sum(1) / valid.sum(1)
            return target - mean_distractor
        next_tokens = self.tokens.gather(1, (positions + 1).clamp(max=self.width - 1))
        log_probs = logits.log_softmax(dim=-1).gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        total = (log_probs * mask.to(log_probs.dtype)).sum(dim=1)
        return total.exp() if metric == "target_prob" else total

    def metric_from_logits(self, logits: Float[Tensor, "batch pos d_vocab"], metric: Metric) -> Float[Tensor, " batch"]:
        """Compute the metric per row from full logits (every position), as ``model(tokens)`` returns them."""
        positions, _ = self.readout(metric)
        rows = torch.arange(len(self), device=logits.device).unsqueeze(1)
        return self.metric_from_readout(logits[rows, positions], metric)

    def to(self, device: torch.device | str) -> FactBatch:
        return FactBatch(self.completions.to(device), self.distractor_ids.to(device))


def make_fact_batch(model: HookedTransformer, facts: Sequence[Fact]) -> FactBatch:
    """Tokenize ``facts`` (prompt + target per row) into one :class:`FactBatch`."""
    completions = make_batch(model, [fact.prompt for fact in facts], [fact.target for fact in facts])
    firsts = [[tokenize_completion(model, d)[0] for d in fact.distractors] for fact in facts]
    width = max(1, max(len(row) for row in firsts))
    distractor_ids = torch.full((len(facts), width), -1, dtype=torch.long)
    for index, row in enumerate(firsts):
        distractor_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return FactBatch(completions, distractor_ids.to(model.cfg.device))


def iter_fact_batches(
    model: HookedTransformer, facts: Sequence[Fact], batch_size: int
) -> Iterator[tuple[slice, FactBatch]]:
    """Yield ``(rows, batch)`` over consecutive chunks of at most ``batch_size`` facts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not facts:
        raise ValueError("no facts to score; pass at least one Fact")
    for start in range(0, len(facts), batch_size):
        rows = slice(start, min(start + batch_size, len(facts)))
        yield rows, make_fact_batch(model, facts[rows])


def iter_fact_batches_by_length(
    model: HookedTransformer, facts: Sequence[Fact], batch_size: int
) -> Iterator[tuple[list[int], FactBatch]]:
    """Yield ``(fact indices, batch)`` with facts sorted by prompt length, so each batch wastes little padding.

    Facts of equal prompt length keep their order; every fact appears in exactly one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not facts:
        raise ValueError("no facts to score; pass at least one Fact")
    lengths = [len(tokenize_prompt(model, fact.prompt)) for fact in facts]
    order = sorted(range(len(facts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, make_fact_batch(model, [facts[i] for i in indices])


def metric_from_residual(
    model: HookedTransformer,
    residual: Float[Tensor, "batch pos d_model"],
    batch: FactBatch,
    metric: Metric,
    *,
    first_position: int = 0,
) -> Float[Tensor, " batch"]:
    """Finish a forward pass from the final residual stream (before ``ln_final``) at the metric's positions only.

    Equal to ``batch.metric_from_logits(model(tokens), metric)`` up to float rounding, at a fraction of the
    unembedding cost. Hooks on ``ln_final`` and ``unembed`` still run, on the gathered positions only.
    ``first_position`` is the token position of ``residual``'s first column, for a pass that computed only the
    positions from there on.
    """
    positions, _ = batch.readout(metric)
    rows = torch.arange(residual.shape[0], device=residual.device).unsqueeze(1)
    # Masked readout slots of short targets can point past the last computed position; they are not used.
    columns = (positions.to(residual.device) - first_position).clamp(max=residual.shape[1] - 1)
    gathered = residual[rows, columns]  # (batch, readout, d_model)
    if model.cfg.normalization_type is not None:
        gathered = model.ln_final(gathered)
    logits = model.unembed(gathered)
    cap = model.cfg.output_logits_soft_cap
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return batch.metric_from_readout(logits, metric)


def run_metric(
    model: HookedTransformer,
    batch: FactBatch,
    metric: Metric,
    *,
    residual: Float[Tensor, "batch pos d_model"] | None = None,
    start_at_layer: int | None = None,
) -> Float[Tensor, " batch"]:
    """Run ``model`` on ``batch`` (or on ``residual`` from block ``start_at_layer``) and return the metric per row.

    Hooks active on ``model`` apply. Gradients flow when the caller enables them.
    """
    if (residual is None) != (start_at_layer is None):
        raise ValueError("pass residual and start_at_layer together, or neither to start from the tokens")
    source = batch.tokens if residual is None else residual
    final = model(source, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers)
    return metric_from_residual(model, final, batch, metric)
