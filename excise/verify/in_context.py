"""In-context attack: show the model k solved forget facts before each question.

Examples in the context can reactivate knowledge that an edit only suppressed: the demonstrations put the model
back into "answer this kind of question" mode, and a suppression that depends on the prompt's framing gives way
(Lynch et al., 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs", use few-shot prompting as one of
their attacks). Knowledge that is gone cannot come back this way, because the demonstrations are other facts.

Each held-out fact gets ``k`` demonstrations, other facts written as ``prompt + target``, one per line, drawn
at random per fact from a separate demonstration set. The demonstrations for ``k`` are the first ``k`` of one
fixed order, so a larger ``k`` adds examples and never swaps them. Accuracy is by likelihood ranking of the
fact's choices after the demonstrations.

Compare the edited model with the original and the twin at equal ``k``: demonstrations also teach the answer
format, so a model that never learned the domain can gain a little too.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from typing import Literal

from transformer_lens import HookedTransformer

from excise.completions import tokenize_completion, tokenize_prompt
from excise.data.facts import Fact
from excise.verify.accuracy import score_facts

DEFAULT_KS = (0, 1, 2, 4, 8)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InContextResult:
    """Held-out accuracy against the number of demonstrations.

    Attributes:
        ks: Numbers of demonstrations, ascending.
        accuracy: Accuracy at each k.
        target_logprob: Mean target log-probability (nats) at each k.
        chance: Chance accuracy of the held-out facts.
        n_facts: Number of held-out facts.
        skipped_ks: Requested numbers of demonstrations left out because some prompt would not fit the model's
            context (only with ``too_long="skip"``).
    """

    ks: list[int]
    accuracy: list[float]
    target_logprob: list[float]
    chance: float
    n_facts: int
    skipped_ks: list[int] = dataclasses.field(default_factory=list)

    @property
    def best_accuracy(self) -> float:
        """Highest accuracy over every k (the attacker picks the best k)."""
        return max(self.accuracy)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def with_demonstrations(
    fact: Fact, demonstrations: Sequence[Fact], k: int, *, seed: int = 0, separator: str = "\n"
) -> Fact:
    """Return ``fact`` with ``k`` of ``demonstrations`` (never the fact itself) written before its prompt."""
    pool = [demo for demo in demonstrations if demo.id != fact.id]
    if k > len(pool):
        raise ValueError(f"k={k} demonstrations requested for fact {fact.id!r} but only {len(pool)} are available")
    random.Random(f"{seed}:{fact.id}").shuffle(pool)
    prefix = "".join(f"{demo.prompt}{demo.target}{separator}" for demo in pool[:k])
    return dataclasses.replace(fact, prompt=prefix + fact.prompt)


def in_context_attack(
    model: HookedTransformer,
    eval_facts: Sequence[Fact],
    demonstrations: Sequence[Fact],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    batch_size: int = 16,
    separator: str = "\n",
    label: str = "model",
    too_long: Literal["raise", "skip"] = "raise",
) -> InContextResult:
    """Measure held-out accuracy with ``k`` demonstrations before each question, for every ``k`` in ``ks``.

    Args:
        model: Any HookedTransformer with a tokenizer.
        eval_facts: The held-out facts asked about.
        demonstrations: Facts shown as solved examples; should be disjoint from ``eval_facts`` (facts with the
            same id are never shown before themselves).
        ks: Numbers of demonstrations; each must be at most the number of demonstrations available per fact.
        seed: Seed of the demonstrations' order.
        batch_size: Sequences per forward pass.
        separator: Text after each demonstration.
        label: Name of the model in progress bars.
        too_long: What to do with a ``k`` whose longest prompt and choice exceed the model's context: ``"raise"``
            a ValueError, or ``"skip"`` that ``k`` and list it in :attr:`InContextResult.skipped_ks` (the verify
            suite does this, so a small model with a short context still gets the ``k`` values that fit).
    """
    if not eval_facts:
        raise ValueError("in_context_attack needs at least one held-out fact")
    ks = sorted(set(ks))
    if not ks or ks[0] < 0:
        raise ValueError(f"ks must be non-empty and >= 0, got {ks}")
    available = min(len([d for d in demonstrations if d.id != fact.id]) for fact in eval_facts)
    if ks[-1] > available:
        raise ValueError(
            f"k={ks[-1]} demonstrations requested but only {available} are available per fact; pass smaller ks "
            f"or more demonstration facts"
        )
    if too_long not in ("raise", "skip"):
        raise ValueError(f"too_long must be 'raise' or 'skip', got {too_long!r}")
    accuracy, logprob, kept, skipped = [], [], [], []
    chance = float("nan")
    for k in ks:
        prompted = [with_demonstrations(fact, demonstrations, k, seed=seed, separator=separator) for fact in eval_facts]
        longest = max(_longest_row(model, fact) for fact in prompted)
        if longest > model.cfg.n_ctx:
            if too_long == "raise":
                raise ValueError(
                    f"with k={k} demonstrations a prompt and its choice take {longest} tokens, more than the model's "
                    f"context of {model.cfg.n_ctx}; pass smaller ks, or too_long='skip'"
                )
            logger.warning("in-context k=%d skipped: %d tokens exceed the context of %d", k, longest, model.cfg.n_ctx)
            skipped.append(k)
            continue
        kept.append(k)
        scores = score_facts(model, prompted, batch_size=batch_size, description=f"in-context k={k} ({label})")
        accuracy.append(scores.accuracy)
        logprob.append(scores.mean_target_logprob)
        chance = scores.chance
    if not kept:
        raise ValueError(
            f"no k in {ks} fits the model's context of {model.cfg.n_ctx} tokens; even k={ks[0]} is too long"
        )
    return InContextResult(
        ks=kept,
        accuracy=accuracy,
        target_logprob=logprob,
        chance=chance,
        n_facts=len(eval_facts),
        skipped_ks=skipped,
    )


def _longest_row(model: HookedTransformer, fact: Fact) -> int:
    """Tokens of the fact's prompt followed by its longest choice."""
    prompt = len(tokenize_prompt(model, fact.prompt))
    return prompt + max(len(tokenize_completion(model, choice)) for choice in (fact.target, *fact.distractors))
