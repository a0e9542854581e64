"""Tokenize prompt and completion pairs in right-padded batches, and read the completions' log-probabilities.

Every stage of excise measures knowledge the same way: the summed log-probability that the model gives a
completion (a fact's target or one of its distractors) after a prompt. This module is the one place that
tokenizes those pairs.

Batches are right-padded. With causal attention a real token never attends to a later position, so padding at the
end changes no real token's activations, with absolute and rotary positions alike. That is why no attention mask
is needed and why left padding, which shifts positions, is never used here.

Warning:
    Prompt and completion are tokenized separately and concatenated. With a BPE tokenizer this matches the
    tokenization of the joined text only when the completion starts with the space that would follow the prompt
    (``" Au"``). :mod:`excise.data.jsonl` checks that for every fact it loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


@dataclasses.dataclass(frozen=True)
class CompletionBatch:
    """Prompt and completion pairs as one right-padded token tensor.

    Attributes:
        tokens: Token ids, right-padded with the tokenizer's pad id.
        prompt_lengths: Number of prompt tokens per row, including a prepended BOS token if any.
        completion_lengths: Number of completion tokens per row (at least 1).
    """

    tokens: Int[Tensor, "batch pos"]
    prompt_lengths: Int[Tensor, " batch"]
    completion_lengths: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def last_prompt_positions(self) -> Int[Tensor, " batch"]:
        """Position of each row's last prompt token, whose output predicts the completion's first token."""
        return self.prompt_lengths - 1

    @property
    def completion_mask(self) -> Float[Tensor, "batch pos"]:
        """1.0 at the positions whose next-token prediction is a completion token, else 0.0.

        Position ``p`` predicts token ``p + 1``, so the mask covers ``prompt_length - 1`` up to
        ``prompt_length + completion_length - 2``.
        """
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        start = (self.prompt_lengths - 1).unsqueeze(1)
        end = start + self.completion_lengths.unsqueeze(1)
        return ((positions >= start) & (positions < end)).float()

    def completion_positions(self) -> tuple[Int[Tensor, "batch n"], Float[Tensor, "batch n"]]:
        """Positions predicting each completion token, padded to the longest completion, and a validity mask."""
        width = int(self.completion_lengths.max())
        offsets = torch.arange(width, device=self.tokens.device)
        positions = (self.prompt_lengths - 1).unsqueeze(1) + offsets
        valid = offsets < self.completion_lengths.unsqueeze(1)
        return positions.clamp(max=self.tokens.shape[1] - 1), valid.float()

    def completion_logits(self, model: HookedTransformer) -> Float[Tensor, "batch n d_vocab"]:
        """Run ``model`` and unembed only the positions that predict completion tokens.

        Unembedding every position of a large vocabulary costs as much as several layers of a small model, and
        scoring needs only these few. Hooks on ``ln_final`` and ``unembed`` still run, on the gathered positions.
        """
        residual = model(self.tokens, stop_at_layer=model.cfg.n_layers)
        positions, _ = self.completion_positions()
        rows = torch.arange(len(self), device=residual.device).unsqueeze(1)
        gathered = residual[rows, positions.to(residual.device)]
        if model.cfg.normalization_type is not None:
            gathered = model.ln_final(gathered)
        return model.unembed(gathered)

    def score(self, model: HookedTransformer) -> Float[Tensor, " batch"]:
        """Summed completion log-probability per row, like :meth:`completion_logprobs` but with less compute."""
        logits = self.completion_logits(model)
        positions, valid = self.completion_positions()
        targets = self.tokens.gather(1, (positions + 1).clamp(max=self.tokens.shape[1] - 1))
        token_log_probs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1).to(logits.device)).squeeze(-1)
        return (token_log_probs * valid.to(token_log_probs.device, token_log_probs.dtype)).sum(dim=1)

    def to(self, device: torch.device | str) -> CompletionBatch:
        return CompletionBatch(
            self.tokens.to(device), self.prompt_lengths.to(device), self.completion_lengths.to(device)
        )

    def completion_logprobs(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """Sum, per row, the log-probabilities of the completion tokens. Differentiable in ``logits``."""
        log_probs = logits.log_softmax(dim=-1)
        next_tokens = torch.roll(self.tokens, shifts=-1, dims=1)
        token_log_probs = log_probs.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        return (token_log_probs * self.completion_mask.to(token_log_probs.dtype)).sum(dim=1)

    def first_token_logits(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch d_vocab"]:
        """Logits at the last prompt position: the distribution over the completion's first token."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.last_prompt_positions.to(logits.device)]


def tokenize_prompt(model: HookedTransformer, prompt: str) -> list[int]:
    """Tokenize a prompt, prepending BOS when the model's config asks for it."""
    tokenizer = _tokenizer(model)
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens; use a non-empty prompt")
    return ids


def tokenize_completion(model: HookedTransformer, completion: str) -> list[int]:
    """Tokenize a completion without special tokens."""
    ids = list(_tokenizer(model).encode(completion, add_special_tokens=False))
    if not ids:
        raise ValueError(f"completion {completion!r} tokenizes to no tokens; use a non-empty completion")
    return ids


def make_batch(model: HookedTransformer, prompts: Sequence[str], completions: Sequence[str]) -> CompletionBatch:
    """Tokenize ``prompts[i] + completions[i]`` for every i into one right-padded batch."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; pass one of each per row")
    if not prompts:
        raise ValueError("cannot build a batch from zero prompts")
    rows: list[list[int]] = []
    prompt_lengths: list[int] = []
    completion_lengths: list[int] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenize_prompt(model, prompt)
        completion_ids = tokenize_completion(model, completion)
        rows.append(prompt_ids + completion_ids)
        prompt_lengths.append(len(prompt_ids))
        completion_lengths.append(len(completion_ids))
    width = max(len(row) for row in rows)
    if width > model.cfg.n_ctx:
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        raise ValueError(
            f"prompt {prompts[longest]!r} with its completion is {width} tokens, longer than the model's context "
            f"of {model.cfg.n_ctx}; shorten it"
        )
    pad_id = _pad_id(model)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return CompletionBatch(
        tokens=tokens.to(model.cfg.device),
        prompt_lengths=torch.tensor(prompt_lengths, device=model.cfg.device),
        completion_lengths=torch.tensor(completion_lengths, device=model.cfg.device),
    )


def make_text_batch(
    model: HookedTransformer, texts: Sequence[str], max_tokens: int | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Tokenize whole texts into a right-padded batch; return the tokens and each row's real length.

    Texts longer than ``max_tokens`` (default: the model's context) are cut to that many tokens.
    """
    if not texts:
        raise ValueError("cannot build a batch from zero texts")
    limit = model.cfg.n_ctx if max_tokens is None else min(max_tokens, model.cfg.n_ctx)
    rows = [tokenize_prompt(model, text)[:limit] for text in texts]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(row) for row in rows])
    return tokens.to(model.cfg.device), lengths.to(model.cfg.device)


def iter_batches(
    model: HookedTransformer, prompts: Sequence[str], completions: Sequence[str], batch_size: int
) -> Iterator[tuple[slice, CompletionBatch]]:
    """Yield ``(rows, batch)`` over consecutive chunks of at most ``batch_size`` pairs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, min(start + batch_size, len(prompts)))
        yield rows, make_batch(model, prompts[rows], completions[rows])


@torch.no_grad()
def completion_logprobs(
    model: HookedTransformer, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32
) -> Float[Tensor, " n"]:
    """Return the summed log-probability of each completion after its prompt, in nats, on the CPU."""
    results = torch.empty(len(prompts))
    for rows, batch in iter_batches(model, prompts, completions, batch_size):
        results[rows] = batch.score(model).float().cpu()
    return results


def _tokenizer(model: HookedTransformer):
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; build it with one or call model.set_tokenizer(...)")
    return model.tokenizer


def _pad_id(model: HookedTransformer) -> int:
    tokenizer = _tokenizer(model)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
