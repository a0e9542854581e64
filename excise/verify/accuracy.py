"""Accuracy by likelihood ranking: does the model prefer a fact's target to every distractor?

A small model rarely states a fact in free generation, but its next-token distribution still shows whether it
knows it. For each fact the model scores the target and each distractor by summed log-probability after the
prompt; the fact counts as known when the target ranks first. Chance is ``1 / n_choices``.

Each prompt runs once. Choices of one token are read from its last position; longer choices continue from the
prompt's key/value cache, and a prefix shared by all prompts (a chat template's system turn) runs once per call.

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

from excise.completions import choice_logprobs
from excise.data.facts import Fact

SCORE_COLUMNS = (
    "id",
    "relation",
    "target_logprob",
    "best_distractor_logprob",
    "margin",
    "rank",
    "n_choices",
    "correct",
    "vocab_rank",
    "vocab_logprob",
)


@dataclasses.dataclass(frozen=True)
class FactScores:
    """Per-fact scores of one model on one fact set.

    Attributes:
        table: One row per fact with columns ``id``, ``relation``, ``target_logprob`` (nats),
            ``best_distractor_logprob``, ``margin`` (target minus best distractor), ``rank`` (0 = target first),
            ``n_choices``, ``correct``, ``vocab_rank`` (tokens with a strictly higher logit than the target's first
            token after the prompt, 0 = the greedy next token) and ``vocab_logprob`` (that token's log-probability).
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
    share_prompts: bool | None = None,
) -> FactScores:
    """Score every fact by ranking its target among its distractors.

    Args:
        model: Any HookedTransformer with a tokenizer. Hook-based edits apply when active during the call.
        facts: The facts to score; may be empty.
        batch_size: Sequences per forward pass. Larger is faster until memory runs out.
        prompt_of: ``"prompt"`` to use each fact's prompt, or ``"paraphrase"`` to use its first paraphrase
            (facts without one are skipped).
        description: Label of the progress bar.
        share_prompts: Run each prompt once and continue every choice from its key/value cache (see
            :func:`excise.completions.choice_logprobs`). None shares unless a hook not marked position-wise is
            active.
    """
    if prompt_of not in ("prompt", "paraphrase"):
        raise ValueError(f"prompt_of must be 'prompt' or 'paraphrase', got {prompt_of!r}")
    if prompt_of == "paraphrase":
        facts = [dataclasses.replace(f, prompt=f.paraphrases[0]) for f in facts if f.paraphrases]

    with tqdm(total=len(facts), desc=description, leave=False, disable=len(facts) <= batch_size) as bar:
        scored = choice_logprobs(
            model,
            [fact.prompt for fact in facts],
            [fact.choices for fact in facts],
            batch_size=batch_size,
            share_prompts=share_prompts,
            progress=bar.update,
        )

    rows = []
    for index, (fact, fact_scores) in enumerate(zip(facts, scored.logprobs, strict=True)):
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
                "vocab_rank": int(scored.first_vocab_rank[index]),
                "vocab_logprob": float(scored.first_vocab_logprob[index]),
            }
        )
    return FactScores(pd.DataFrame(rows, columns=list(SCORE_COLUMNS)))
