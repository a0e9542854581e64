"""Prompt attacks: ask each forgotten fact in many formats and count it recovered if any format gets it right.

An edit that only learned to suppress one phrasing leaves the knowledge reachable through others: paraphrases,
a multiple-choice question, a fill-in-the-blank frame, a role-play or "ignore previous instructions" prefix, the
chat format (Lynch et al., 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs"; Schwinn et al., 2024,
"Soft Prompt Threats"). Each format is scored by likelihood ranking (:mod:`excise.verify.formats`).

The attack's figure is **best-of-N accuracy**: a fact counts as recovered when at least one of its N formats ranks
the target first. Best-of-N inflates chance, since N guesses among four choices hit at least once with
probability ``1 - (3/4)^N``; the result reports that chance (assuming independent guesses, an upper reference
because formats of one fact are correlated). The fair comparison is the same best-of-N on the original and on the
twin that never learned the domain.

Other languages: facts carry no translations, so translated prompts come in through ``extra_prompts`` (an
attempt name mapped to a prompt per fact id) or through a domain's paraphrases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from excise.data.facts import Fact
from excise.verify.accuracy import score_facts
from excise.verify.formats import PromptFormat, format_facts, has_chat_template

PREFIX_FORMATS: tuple[PromptFormat, ...] = ("multiple_choice", "fill_in", "role_play", "ignore_instructions")
CHAT_FORMATS: tuple[PromptFormat, ...] = ("chat", "chat_question")


@dataclasses.dataclass(frozen=True)
class PromptAttackResult:
    """Per-format and best-of-N accuracy on one fact set.

    Attributes:
        correct: One row per fact (index ``id``), one column per attempt: True when that attempt ranks the target
            first, missing (``<NA>``) when the fact has no such attempt (a second paraphrase it lacks).
        n_choices: Same layout: number of choices of each attempt, for chance levels.
    """

    correct: pd.DataFrame
    n_choices: pd.DataFrame

    @property
    def attempts(self) -> list[str]:
        return list(self.correct.columns)

    @property
    def n_attempts(self) -> int:
        return len(self.correct.columns)

    def accuracy(self) -> dict[str, float]:
        """Accuracy of each attempt over the facts that have it."""
        return {
            str(name): float(np.mean(column.dropna().to_numpy(dtype=bool))) for name, column in self.correct.items()
        }

    def chance(self) -> dict[str, float]:
        """Chance accuracy of each attempt over the facts that have it."""
        return {
            str(name): float(np.mean(1.0 / column.dropna().to_numpy(dtype=float)))
            for name, column in self.n_choices.items()
        }

    @property
    def best_of_n(self) -> float:
        """Fraction of facts that at least one attempt gets right."""
        return float(self.correct.fillna(False).astype(bool).any(axis=1).mean()) if len(self.correct) else float("nan")

    @property
    def best_of_n_chance(self) -> float:
        """Chance that at least one attempt guesses right, assuming independent uniform guesses, averaged over facts."""
        if not len(self.n_choices):
            return float("nan")
        miss = (1.0 - 1.0 / self.n_choices.astype(float)).fillna(1.0)
        return float((1.0 - miss.prod(axis=1)).mean())

    def to_dict(self) -> dict[str, object]:
        return {
            "attempts": self.attempts,
            "accuracy": self.accuracy(),
            "chance": self.chance(),
            "best_of_n": self.best_of_n,
            "best_of_n_chance": self.best_of_n_chance,
            "n_facts": len(self.correct),
        }


def prompt_attack(
    model: HookedTransformer,
    facts: Sequence[Fact],
    *,
    max_paraphrases: int = 2,
    formats: Sequence[PromptFormat] = PREFIX_FORMATS,
    chat: bool = True,
    extra_prompts: Mapping[str, Mapping[str, str]] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    label: str = "model",
) -> PromptAttackResult:
    """Score ``facts`` in every format and collect which attempts rank the target first.

    Args:
        model: Any HookedTransformer with a tokenizer.
        facts: The facts to attack; may be empty.
        max_paraphrases: Use up to this many of each fact's paraphrases, each as its own attempt.
        formats: Formats other than the plain prompt, paraphrases and chat (see :data:`PREFIX_FORMATS`).
        chat: Add the chat formats when the tokenizer has a chat template.
        extra_prompts: More attempts, e.g. translations: attempt name to ``{fact id: prompt}``; facts without an
            entry have no such attempt. Targets and distractors stay the fact's own.
        seed: Seed of the multiple-choice orders.
        batch_size: Sequences per forward pass.
        label: Name of the model in progress bars.

    The same arguments must be used for every model compared, so that N is equal.
    """
    if max_paraphrases < 0:
        raise ValueError(f"max_paraphrases must be >= 0, got {max_paraphrases}")
    plan: list[tuple[str, list[tuple[int, Fact]]]] = [("plain", list(enumerate(facts)))]
    for variant in range(max_paraphrases):
        plan.append((f"paraphrase_{variant + 1}", format_facts(model, facts, "paraphrase", variant=variant)))
    for fmt in formats:
        if fmt in ("plain", "paraphrase"):
            raise ValueError(f"format {fmt!r} is always included; list other formats in formats")
        plan.append((fmt, format_facts(model, facts, fmt, seed=seed)))
    if chat and has_chat_template(model):
        plan.extend((fmt, format_facts(model, facts, fmt, seed=seed)) for fmt in CHAT_FORMATS)
    for name, prompts in (extra_prompts or {}).items():
        pairs = [(i, dataclasses.replace(f, prompt=prompts[f.id])) for i, f in enumerate(facts) if f.id in prompts]
        plan.append((name, pairs))

    ids = [fact.id for fact in facts]
    correct = pd.DataFrame(index=pd.Index(ids, name="id"))
    n_choices = pd.DataFrame(index=pd.Index(ids, name="id"))
    for name, pairs in plan:
        column = pd.array([pd.NA] * len(facts), dtype="boolean")
        choices = np.full(len(facts), np.nan)
        if pairs:
            scores = score_facts(
                model, [fact for _, fact in pairs], batch_size=batch_size, description=f"{name} ({label})"
            )
            for (index, _), ok, n in zip(pairs, scores.table["correct"], scores.table["n_choices"], strict=True):
                column[index] = bool(ok)
                choices[index] = n
        correct[name] = column
        n_choices[name] = choices
    return PromptAttackResult(correct=correct, n_choices=n_choices)
