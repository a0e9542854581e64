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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry


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
        return unembed_residual(model, residual[rows, positions.to(residual.device)])

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
    prompt_ids = [tokenize_prompt(model, prompt) for prompt in prompts]
    completion_ids = [tokenize_completion(model, completion) for completion in completions]
    widths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    if max(widths) > model.cfg.n_ctx:
        longest = widths.index(max(widths))
        raise ValueError(
            f"prompt {prompts[longest]!r} with its completion is {widths[longest]} tokens, longer than the model's "
            f"context of {model.cfg.n_ctx}; shorten it"
        )
    return _pad_rows(model, prompt_ids, completion_ids)


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
    tokens, _ = _right_pad(model, rows)
    return tokens, torch.tensor([len(row) for row in rows], device=model.cfg.device)


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


def position_wise(function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a TransformerLens hook function and mark it as acting on each token position alone.

    A position-wise hook gives the same output for a token whether the sequence runs in one pass or in pieces
    that share a key/value cache, so :func:`choice_logprobs` may share prompt computation while it is active.
    Every excise edit marks its hooks this way. A hook that indexes positions (patching position 5, say) must not
    be marked.
    """
    if not callable(function):
        raise TypeError(f"position_wise needs a hook function, got {type(function).__name__}")

    def hook(activation: Any, hook: Any) -> Any:
        return function(activation, hook=hook)

    hook.excise_position_wise = True  # type: ignore[attr-defined]
    return hook


def only_position_wise_hooks(model: HookedTransformer) -> bool:
    """Whether every forward hook active on ``model`` is marked by :func:`position_wise` (true with no hooks)."""
    for hook_point in model.hook_dict.values():
        for handle in hook_point.fwd_hooks:
            if not getattr(handle.user_hook, "excise_position_wise", False):
                return False
    return True


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """Summed log-probabilities of each prompt's choices, and where its first choice's first token ranks.

    Attributes:
        logprobs: Per prompt, the summed log-probability (nats) of each of its choices after it.
        first_vocab_rank: Per prompt, the number of tokens with a strictly higher logit than the first token of
            its first choice (0 = the greedy next token).
        first_vocab_logprob: Per prompt, the log-probability of that token.
    """

    logprobs: list[np.ndarray]
    first_vocab_rank: np.ndarray
    first_vocab_logprob: np.ndarray


@torch.no_grad()
def choice_logprobs(
    model: HookedTransformer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    share_prompts: bool | None = None,
    progress: Callable[[int], Any] | None = None,
) -> ChoiceScores:
    """Score every choice of every prompt by its summed log-probability after the prompt.

    With ``share_prompts`` each prompt runs once and its choices continue from its key/value cache, and the
    token prefix that all prompts share (a chat template's system turn, say) runs once for the whole call.
    Without it, every ``prompt + choice`` pair runs as a full sequence. Both give the same numbers up to float
    rounding. The default shares prompts unless a forward hook not marked by :func:`position_wise` is active,
    since a hook that indexes positions would see the choice tokens at the wrong offsets.

    Args:
        model: Any HookedTransformer with a tokenizer.
        prompts: The prompts.
        choices: Per prompt, at least one completion; the first is the one whose vocabulary rank is reported.
        batch_size: Prompts per forward pass (choice continuations run up to twice as many rows).
        share_prompts: Share prompt computation across choices; None decides from the active hooks.
        progress: Called with the number of prompts done after each batch, e.g. a tqdm bar's ``update``.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"got {len(prompts)} prompts but {len(choices)} choice lists; pass one list per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_ids = [tokenize_prompt(model, prompt) for prompt in prompts]
    choice_ids = []
    for prompt, ids, options in zip(prompts, prompt_ids, choices, strict=True):
        if not options:
            raise ValueError(f"prompt {prompt!r} has no choices; give it at least one completion")
        tokens = [tokenize_completion(model, option) for option in options]
        width = len(ids) + max(len(t) for t in tokens)
        if width > model.cfg.n_ctx:
            raise ValueError(
                f"prompt {prompt!r} with its longest choice is {width} tokens, longer than the model's context "
                f"of {model.cfg.n_ctx}; shorten it"
            )
        choice_ids.append(tokens)
    if share_prompts is None:
        share_prompts = only_position_wise_hooks(model)
    scorer = _SharedPromptScorer(model, prompt_ids) if share_prompts else _FullSequenceScorer(model)
    logprobs: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        chunk_scores, chunk_ranks, chunk_firsts = scorer.score(
            [prompt_ids[i] for i in rows], [choice_ids[i] for i in rows], 2 * batch_size
        )
        logprobs.extend(chunk_scores)
        ranks.append(chunk_ranks)
        firsts.append(chunk_firsts)
        if progress is not None:
            progress(len(rows))
    return ChoiceScores(
        logprobs=logprobs,
        first_vocab_rank=np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64),
        first_vocab_logprob=np.concatenate(firsts) if firsts else np.zeros(0),
    )


_Scored = tuple[list[np.ndarray], np.ndarray, np.ndarray]


def unembed_residual(model: HookedTransformer, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Apply the model's final normalization (when it has one) and unembedding to residual-stream vectors.

    Hooks on ``ln_final`` and ``unembed`` run as in a full forward pass.
    """
    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    return model.unembed(residual)


def _first_token_stats(log_probs: Tensor, first_ids: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Vocabulary rank and log-probability of ``first_ids`` under each row of ``log_probs``."""
    chosen = log_probs.gather(-1, first_ids.unsqueeze(-1))
    return (log_probs > chosen).sum(-1).cpu().numpy(), chosen.squeeze(-1).cpu().numpy()


class _FullSequenceScorer:
    """Runs each ``prompt + choice`` as its own right-padded row; only single-token choices share a row."""

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model

    def score(self, prompts: list[list[int]], choices: list[list[list[int]]], max_rows: int) -> _Scored:
        model, device = self.model, self.model.cfg.device

        # Row per prompt for its first choice (all of its choices when they are single tokens), then one row per
        # further choice that spans several tokens.
        pairs = [(i, 0) for i in range(len(prompts))]
        pairs += [
            (i, j)
            for i, options in enumerate(choices)
            if any(len(t) > 1 for t in options)
            for j in range(1, len(options))
        ]

        totals: dict[tuple[int, int], float] = {}
        first_rows: dict[int, Tensor] = {}
        for start in range(0, len(pairs), max_rows):
            part = pairs[start : start + max_rows]
            batch = _pad_rows(model, [prompts[i] for i, _ in part], [choices[i][j] for i, j in part])
            log_probs = batch.completion_logits(model).float().log_softmax(-1)
            positions, valid = batch.completion_positions()
            targets = batch.tokens.gather(1, (positions + 1).clamp(max=batch.tokens.shape[1] - 1))
            token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid
            for row, (i, j) in enumerate(part):
                totals[(i, j)] = float(token_lp[row].sum())
                if j == 0:
                    first_rows[i] = log_probs[row, 0].clone()  # A copy, so the batch tensor can be freed.

        scores = []
        for i, options in enumerate(choices):
            if all(len(t) == 1 for t in options):
                ids = torch.tensor([t[0] for t in options], device=device)
                scores.append(first_rows[i][ids].cpu().numpy().astype(np.float64))
            else:
                scores.append(np.array([totals[(i, j)] for j in range(len(options))]))

        stacked = torch.stack([first_rows[i] for i in range(len(prompts))])
        first_ids = torch.tensor([options[0][0] for options in choices], device=device)
        ranks, firsts = _first_token_stats(stacked, first_ids)
        return scores, ranks, firsts


class PromptRunner:
    """Runs batches of prompts into key/value caches, computing the token prefix they all share only once.

    Prompts of different lengths share a batch: they are right-padded and the padding is masked out, so tokens
    appended later through the cache get the positions they would have right after each prompt. Made for a fixed
    set of prompts (all that one call scores or continues); each batch passed to :meth:`run` must come from it.
    """

    def __init__(self, model: HookedTransformer, all_prompts: Sequence[list[int]]) -> None:
        self.model = model
        self.prefix_length = _common_prefix_length(all_prompts) if all_prompts else 0
        self.prefix: TransformerLensKeyValueCache | None = None
        if self.prefix_length > 0:
            self.prefix = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
            tokens = torch.tensor([all_prompts[0][: self.prefix_length]], device=model.cfg.device)
            # Masks are always explicit: TransformerLens would otherwise infer padding from pad-token ids, which chat
            # templates also use inside prompts when the pad token is the end-of-turn token.
            mask = torch.ones_like(tokens)
            model(tokens, past_kv_cache=self.prefix, attention_mask=mask, stop_at_layer=model.cfg.n_layers)

    def run(self, prompts: Sequence[list[int]]) -> tuple[TransformerLensKeyValueCache, Tensor]:
        """Run ``prompts``; return their cache and the next-token logits (float32) after each prompt."""
        model, device = self.model, self.model.cfg.device
        n = len(prompts)
        if self.prefix is None:
            cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, n)
        else:
            cache = _select_rows(self.prefix, torch.zeros(n, dtype=torch.long, device=device))
        suffixes = [ids[self.prefix_length :] for ids in prompts]
        tokens, mask = _right_pad(model, suffixes)
        residual = model(tokens, past_kv_cache=cache, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
        last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        return cache, unembed_residual(model, residual[torch.arange(n, device=device), last]).float()


class _SharedPromptScorer:
    """Runs each prompt once (see :class:`PromptRunner`) and each longer choice from its prompt's cache."""

    def __init__(self, model: HookedTransformer, all_prompts: Sequence[list[int]]) -> None:
        self.model = model
        self.runner = PromptRunner(model, all_prompts)

    def score(self, prompts: list[list[int]], choices: list[list[list[int]]], max_rows: int) -> _Scored:
        model, device = self.model, self.model.cfg.device
        cache, first_logits = self.runner.run(prompts)
        first_log_probs = first_logits.log_softmax(-1)

        scores = [
            first_log_probs[i, torch.tensor([t[0] for t in options], device=device)].cpu().numpy().astype(np.float64)
            for i, options in enumerate(choices)
        ]
        # Choices of two or more tokens continue from their prompt's cache; their first token is scored above.
        longer = [(i, j) for i, options in enumerate(choices) for j, t in enumerate(options) if len(t) > 1]
        for start in range(0, len(longer), max_rows):
            part = longer[start : start + max_rows]
            rows = torch.tensor([i for i, _ in part], device=device)
            continuation = _select_rows(cache, rows)
            inputs, input_mask = _right_pad(model, [choices[i][j][:-1] for i, j in part])
            residual = model(
                inputs, past_kv_cache=continuation, attention_mask=input_mask, stop_at_layer=model.cfg.n_layers
            )
            log_probs = unembed_residual(model, residual).float().log_softmax(-1)
            targets, valid = _right_pad(model, [choices[i][j][1:] for i, j in part])
            token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid
            for row, (i, j) in enumerate(part):
                scores[i][j] += float(token_lp[row].sum())
        first_ids = torch.tensor([options[0][0] for options in choices], device=device)
        ranks, firsts = _first_token_stats(first_log_probs, first_ids)
        return scores, ranks, firsts


def _common_prefix_length(sequences: Sequence[list[int]]) -> int:
    """Length of the token prefix shared by every sequence, leaving at least one token of the shortest."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def _right_pad(model: HookedTransformer, rows: Sequence[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded token ids and a mask that is 1 on real tokens."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)


def _pad_rows(
    model: HookedTransformer, prompts: Sequence[list[int]], completions: Sequence[list[int]]
) -> CompletionBatch:
    tokens, _ = _right_pad(model, [p + c for p, c in zip(prompts, completions, strict=True)])
    device = model.cfg.device
    return CompletionBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor([len(p) for p in prompts], device=device),
        completion_lengths=torch.tensor([len(c) for c in completions], device=device),
    )


def _select_rows(cache: TransformerLensKeyValueCache, rows: Tensor) -> TransformerLensKeyValueCache:
    """Return a new cache that contains the given batch rows of ``cache`` (a row may repeat)."""
    entries = [
        TransformerLensKeyValueCacheEntry(entry.past_keys[rows], entry.past_values[rows]) for entry in cache.entries
    ]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[rows])


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
