"""Accuracy by likelihood ranking: does the model prefer a fact's target to every distractor?

A small model rarely states a fact in free generation, but its next-token distribution still shows whether it
knows it. For each fact the model scores the target and each distractor by summed log-probability after the
prompt; the fact counts as known when the target ranks first. Chance is ``1 / n_choices``.

Choices of one token are read from a single forward pass over the prompt. Facts with a multi-token choice score
every ``prompt + choice`` sequence instead.

NOTE: Summed log-probabilities favour short choices, so a multi-token target competes at a disadvantage with
single-token distractors. Bundled facts keep choices of one type and similar length to limit that bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import make_batch, tokenize_completion
from excise.data.facts import Fact


@dataclasses.dataclass(frozen=True)
class FactScores:
    """Per-fact scores of one model on one fact set.

    Attributes:
        table: One row per fact with columns ``id``, ``relation``, ``target_logprob`` (nats),
            ``best_distractor_logprob``, ``margin`` (target minus best distractor), ``rank`` (0 = target first),
            ``n_choices`` and ``correct``.
    """

    table: pd.DataFrame

    @property
    def accuracy(self) -> float:
        """Fraction of facts whose target ranks first; NaN for an empty set."""
        return float(np.mean(self.table["correct"].to_numpy(dtype=float))) if len(self.table) else float("nan")

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing, averaged over facts."""
        return float(np.mean(1.0 / self.table["n_choices"].to_numpy(dtype=float))) if len(self.table) else float("nan")

    @property
    def mean_target_logprob(self) -> float:
        return float(np.mean(self.table["target_logprob"].to_numpy(dtype=float))) if len(self.table) else float("nan")

    def known_ids(self) -> list[str]:
        """Ids of the facts whose target ranks first."""
        return self.table.loc[self.table["correct"], "id"].tolist()

    def summary(self) -> dict[str, float | int]:
        """Accuracy, chance, mean target log-prob, mean rank and count, as plain numbers for JSON."""
        return {
            "accuracy": self.accuracy,
            "chance": self.chance,
            "mean_target_logprob": self.mean_target_logprob,
            "mean_rank": float(np.mean(self.table["rank"].to_numpy(dtype=float))) if len(self.table) else float("nan"),
            "n": len(self.table),
        }


@torch.no_grad()
def score_facts(
    model: HookedTransformer,
    facts: Sequence[Fact],
    *,
    batch_size: int = 32,
    prompt_of: str = "prompt",
    description: str = "scoring facts",
) -> FactScores:
    """Score every fact by ranking its target among its distractors.

    Args:
        model: Any HookedTransformer with a tokenizer. Hook-based edits apply when active during the call.
        facts: The facts to score; may be empty.
        batch_size: Sequences per forward pass. Larger is faster until memory runs out.
        prompt_of: ``"prompt"`` to use each fact's prompt, or ``"paraphrase"`` to use its first paraphrase
            (facts without one are skipped).
        description: Label of the progress bar.
    """
    if prompt_of not in ("prompt", "paraphrase"):
        raise ValueError(f"prompt_of must be 'prompt' or 'paraphrase', got {prompt_of!r}")
    if prompt_of == "paraphrase":
        facts = [dataclasses.replace(f, prompt=f.paraphrases[0]) for f in facts if f.paraphrases]

    choice_tokens = [[tokenize_completion(model, choice) for choice in fact.choices] for fact in facts]
    single = [i for i, tokens in enumerate(choice_tokens) if all(len(t) == 1 for t in tokens)]
    multi = [i for i, tokens in enumerate(choice_tokens) if any(len(t) > 1 for t in tokens)]
    scores: list[np.ndarray | None] = [None] * len(facts)

    n_batches = -(-len(single) // batch_size) + -(-sum(len(facts[i].choices) for i in multi) // batch_size)
    with tqdm(total=n_batches, desc=description, leave=False, disable=n_batches < 2) as bar:
        for start in range(0, len(single), batch_size):
            chunk = single[start : start + batch_size]
            batch = make_batch(model, [facts[i].prompt for i in chunk], [facts[i].target for i in chunk])
            log_probs = batch.completion_logits(model)[:, 0].log_softmax(-1).float().cpu()
            for row, index in enumerate(chunk):
                ids = [tokens[0] for tokens in choice_tokens[index]]
                scores[index] = log_probs[row, ids].numpy()
            bar.update()

        pairs = [(i, choice) for i in multi for choice in facts[i].choices]
        flat = np.empty(len(pairs))
        for start in range(0, len(pairs), batch_size):
            chunk_pairs = pairs[start : start + batch_size]
            batch = make_batch(model, [facts[i].prompt for i, _ in chunk_pairs], [c for _, c in chunk_pairs])
            flat[start : start + len(chunk_pairs)] = batch.score(model).float().cpu()
            bar.update()
        offset = 0
        for index in multi:
            n = len(facts[index].choices)
            scores[index] = flat[offset : offset + n]
            offset += n

    rows = []
    for fact, fact_scores in zip(facts, scores, strict=True):
        assert fact_scores is not None  # every index is in single or multi
        target, distractors = float(fact_scores[0]), fact_scores[1:]
        rank = int((distractors >= target).sum())
        rows.append(
            {
                "id": fact.id,
                "relation": fact.relation,
                "target_logprob": target,
                "best_distractor_logprob": float(distractors.max()),
                "margin": target - float(distractors.max()),
                "rank": rank,
                "n_choices": len(fact.choices),
                "correct": rank == 0,
            }
        )
    columns = ["id", "relation", "target_logprob", "best_distractor_logprob", "margin", "rank", "n_choices", "correct"]
    return FactScores(pd.DataFrame(rows, columns=columns))
