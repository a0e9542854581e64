"""Behaviour: what a model says about each fact set, by likelihood, by greedy generation, and on generic text.

Three views of the same knowledge, from cheapest to most user-like:

1. Likelihood ranking of the target among its distractors (:func:`excise.verify.accuracy.score_facts`), plus the
   rank of the target's first token in the whole vocabulary and its log-probability. A model can rank the target
   first among four choices while it would never say it (vocabulary rank 500), or say it while an edit only
   pushed it just below one distractor.
2. Greedy generation in the model's chat format (:func:`excise.verify.formats.chat_prompt`): the question is
   asked as a user turn, the assistant turn is opened with the cloze prompt, and the fact counts as stated when
   the first of its choices that the continuation names is the target. This is what a user of an instruct
   model sees.
3. Perplexity on generic text, the usual check that an edit left the rest of the model's language intact.

Generation runs prompts through a key/value cache, with the prefix they share (the chat template's system turn) run
once; hook-based edits must act on each position alone, as every excise edit does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import PromptRunner, make_text_batch, tokenize_prompt
from excise.data.facts import Fact
from excise.verify.accuracy import SCORE_COLUMNS, FactScores, score_facts
from excise.verify.formats import CHAT_INSTRUCTION, chat_prompt, has_chat_template


@dataclasses.dataclass(frozen=True)
class BehaviourSettings:
    """How much behaviour to measure.

    Attributes:
        batch_size: Sequences per forward pass.
        generation_facts: Facts per set that are also checked by greedy generation (the first ones in order);
            None for all. Generation costs ``max_new_tokens`` forward passes per batch, so it is capped.
        max_new_tokens: Tokens generated per fact. Short answers need few; a chatty model may name the answer
            only after some words.
        perplexity_texts: Generic texts used for perplexity (the first ones in order).
        perplexity_tokens: Tokens kept per text.
    """

    batch_size: int = 16
    generation_facts: int | None = 32
    max_new_tokens: int = 8
    perplexity_texts: int = 32
    perplexity_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "perplexity_texts", "perplexity_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"BehaviourSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.generation_facts is not None and self.generation_facts < 0:
            raise ValueError(f"BehaviourSettings.generation_facts must be >= 0 or None, got {self.generation_facts}")


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """Behaviour of one model on each fact set and on generic text.

    Attributes:
        tables: Per fact set, one row per fact: the columns of :class:`FactScores`, plus ``vocab_rank`` (rank of
            the target's first token among all tokens, 0 = most likely) and ``vocab_logprob`` (its log-probability
            in nats), plus for the facts checked by generation ``completion`` (generated text), ``stated``
            (whether the target is the first choice named) and ``mentioned`` (whether the target is named at all);
            those are missing (NaN / None) for facts not generated.
        perplexity: Perplexity on the generic texts; NaN without texts.
        n_perplexity_tokens: Predicted tokens behind ``perplexity``.
        chat_template: Whether generation used the tokenizer's chat template (else the plain prompt).
    """

    tables: dict[str, pd.DataFrame]
    perplexity: float
    n_perplexity_tokens: int
    chat_template: bool

    def scores(self, which: str) -> FactScores:
        """The likelihood-ranking scores of one set, as :func:`score_facts` returns them."""
        return FactScores(pd.DataFrame(self.tables[which], columns=list(SCORE_COLUMNS)))

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Per set: the FactScores summary plus vocabulary-rank and generation figures; ``"generic_text"``."""
        result: dict[str, dict[str, float | int]] = {}
        for which, table in self.tables.items():
            entry = dict(self.scores(which).summary())
            ranks = table["vocab_rank"].to_numpy(dtype=float)
            entry["median_vocab_rank"] = float(np.median(ranks)) if len(ranks) else float("nan")
            entry["vocab_top1"] = float(np.mean(ranks == 0)) if len(ranks) else float("nan")
            entry["vocab_top10"] = float(np.mean(ranks < 10)) if len(ranks) else float("nan")
            generated = table["stated"].dropna().to_numpy(dtype=bool)
            entry["generation_accuracy"] = float(np.mean(generated)) if len(generated) else float("nan")
            mentioned = table["mentioned"].dropna().to_numpy(dtype=bool)
            entry["generation_mentioned"] = float(np.mean(mentioned)) if len(mentioned) else float("nan")
            entry["generation_n"] = len(generated)
            result[which] = entry
        result["generic_text"] = {"perplexity": self.perplexity, "n_tokens": self.n_perplexity_tokens}
        return result


def measure_behaviour(
    model: HookedTransformer,
    fact_sets: Mapping[str, Sequence[Fact]],
    texts: Sequence[str] = (),
    settings: BehaviourSettings = BehaviourSettings(),
    *,
    label: str = "model",
) -> Behaviour:
    """Measure likelihood ranking, vocabulary rank, chat-format generation and perplexity.

    Args:
        model: Any HookedTransformer with a tokenizer; hook-based edits apply when active during the call.
        fact_sets: Named fact sets, e.g. ``{"forget": ..., "neighbour": ..., "retain": ...}``; sets may be empty.
        texts: Generic text for perplexity; empty to skip it.
        settings: Batch size and how much to generate.
        label: Name of the model in progress bars.
    """
    tables = {}
    for which, facts in fact_sets.items():
        scores = score_facts(model, facts, batch_size=settings.batch_size, description=f"scoring {which} ({label})")
        table = scores.table.copy()
        n_generate = len(facts) if settings.generation_facts is None else min(settings.generation_facts, len(facts))
        generation = generation_scores(
            model,
            facts[:n_generate],
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            description=f"generating {which} ({label})",
        )
        table["completion"] = [*generation["completion"], *([None] * (len(facts) - n_generate))]
        for column in ("stated", "mentioned"):
            table[column] = pd.array([*generation[column], *([None] * (len(facts) - n_generate))], dtype="boolean")
        tables[which] = table
    if texts:
        ppl, n_tokens = perplexity(
            model,
            texts[: settings.perplexity_texts],
            max_tokens=settings.perplexity_tokens,
            batch_size=settings.batch_size,
        )
    else:
        ppl, n_tokens = float("nan"), 0
    return Behaviour(
        tables=tables, perplexity=ppl, n_perplexity_tokens=n_tokens, chat_template=has_chat_template(model)
    )


@torch.no_grad()
def generate_greedy(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    description: str = "generating",
) -> list[str]:
    """Continue each prompt greedily by ``max_new_tokens`` tokens and return the decoded continuations.

    Prompts run in batches through a key/value cache, right-padded with the padding masked out, and the prefix
    they all share runs once (:class:`excise.completions.PromptRunner`). A continuation is cut at the first
    end-of-sequence token. Generation stops early when the batch's longest prompt reaches the model's context size.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; build it with one or call model.set_tokenizer(...)")
    encoded = [tokenize_prompt(model, prompt) for prompt in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if len(ids) >= model.cfg.n_ctx:
            raise ValueError(
                f"prompt {prompt!r} is {len(ids)} tokens, which fills the model's context of {model.cfg.n_ctx}; "
                "shorten it"
            )
    runner = PromptRunner(model, encoded)
    outputs: list[str] = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=description, leave=False, disable=len(starts) < 2):
        chunk = encoded[start : start + batch_size]
        n_new = min(max_new_tokens, model.cfg.n_ctx - max(len(ids) for ids in chunk))
        cache, logits = runner.run(chunk)
        generated = []
        for step in range(n_new):
            next_tokens = logits.argmax(-1)
            generated.append(next_tokens)
            if step + 1 < n_new:
                step_tokens = next_tokens.unsqueeze(1)
                logits = model(step_tokens, past_kv_cache=cache, attention_mask=torch.ones_like(step_tokens))[:, -1]
        new_tokens = torch.stack(generated, dim=1).tolist()
        for row, ids in enumerate(new_tokens):
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            outputs[start + row] = str(tokenizer.decode(ids))
    return outputs


def generation_scores(
    model: HookedTransformer,
    facts: Sequence[Fact],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    description: str = "generating",
) -> pd.DataFrame:
    """Ask each fact in the chat format and check the greedy answer.

    Returns a frame with columns ``id``, ``completion``, ``mentioned`` (the target is named somewhere) and
    ``stated`` (the target is the first of the fact's choices to be named). Names match as whole words, ignoring
    case.
    """
    prompts = [chat_prompt(model, CHAT_INSTRUCTION.format(prompt=fact.prompt), fact.prompt) for fact in facts]
    completions = (
        generate_greedy(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, description=description)
        if facts
        else []
    )
    stated, mentioned = [], []
    for fact, completion in zip(facts, completions, strict=True):
        positions = [_first_mention(completion, choice) for choice in fact.choices]
        mentioned.append(positions[0] is not None)
        found = [(position, index) for index, position in enumerate(positions) if position is not None]
        stated.append(bool(found) and min(found)[1] == 0)
    return pd.DataFrame(
        {"id": [fact.id for fact in facts], "completion": completions, "mentioned": mentioned, "stated": stated}
    )


@torch.no_grad()
def perplexity(
    model: HookedTransformer, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 8
) -> tuple[float, int]:
    """Perplexity of ``texts`` (each cut to ``max_tokens`` tokens) and the number of predicted tokens.

    Perplexity is ``exp`` of the mean next-token negative log-likelihood over every real token after the first
    of each text.
    """
    if not texts:
        raise ValueError("perplexity needs at least one text")
    total, count = 0.0, 0
    for start in tqdm(range(0, len(texts), batch_size), desc="perplexity", leave=False):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size], max_tokens)
        log_probs = model(tokens).float().log_softmax(-1)[:, :-1]
        token_log_probs = log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(1, tokens.shape[1], device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        total -= float(token_log_probs[mask].sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError("every text is a single token; perplexity needs texts of two or more tokens")
    return math.exp(total / count), count


def _first_mention(text: str, choice: str) -> int | None:
    word = choice.strip()
    if not word:
        return None
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE)
    return match.start() if match else None
