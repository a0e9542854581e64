"""Finetuning relearning attack: how fast does forgotten knowledge come back under a little training?

The attacker finetunes the model on one split of the forget facts (prompt followed by target, next-token loss on
the target) and watches accuracy on the other, held-out split. Knowledge that was only suppressed returns on the
held-out facts within a few steps, because training on related facts undoes the suppression; knowledge that was
removed has to be learned fact by fact and does not transfer (Lynch et al., 2024, "Eight Methods to Evaluate
Robust Unlearning in LLMs"; Deeb and Roger, 2024, "Do Unlearning Methods Remove Information from LLM Weights?").

The attack runs on a deep copy, so the caller's model is never trained. Compare curves of the edited model and
the original under the same budget (steps, learning rate, batch size, data, seed).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import make_batch
from excise.data.facts import Fact
from excise.verify.accuracy import score_facts


@dataclasses.dataclass(frozen=True)
class RelearnSettings:
    """The attacker's budget.

    Attributes:
        steps: Optimizer steps.
        lr: Adam learning rate. Small models forget and relearn at very different rates; 1e-5 to 1e-4 is usual
            for full finetuning of a 100M-parameter model.
        batch_size: Training facts per step, drawn in a fixed shuffled order that cycles.
        eval_every: Measure held-out accuracy every this many steps (always at 0 and at the last step).
        seed: Seed of the data order.
    """

    steps: int = 20
    lr: float = 3e-5
    batch_size: int = 8
    eval_every: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RelearnSettings.steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"RelearnSettings.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"RelearnSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.eval_every < 1:
            raise ValueError(f"RelearnSettings.eval_every must be >= 1, got {self.eval_every}")


@dataclasses.dataclass(frozen=True)
class RelearnCurve:
    """Held-out accuracy during a relearning attack.

    Attributes:
        steps: Optimizer steps at which accuracy was measured (starting at 0).
        accuracy: Held-out accuracy at each of ``steps``.
        target_logprob: Mean held-out target log-probability (nats) at each of ``steps``.
        train_loss: Training loss at every step (1-based step ``i`` at index ``i - 1``).
    """

    steps: list[int]
    accuracy: list[float]
    target_logprob: list[float]
    train_loss: list[float]

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return dataclasses.asdict(self)


def relearn(
    model: HookedTransformer,
    train_facts: Sequence[Fact],
    eval_facts: Sequence[Fact],
    settings: RelearnSettings = RelearnSettings(),
    *,
    description: str = "relearning",
) -> RelearnCurve:
    """Finetune a copy of ``model`` on ``train_facts`` and record accuracy on ``eval_facts``.

    Every parameter of the copy is trained (full finetuning) with Adam. ``model`` itself is not changed.
    """
    if not train_facts:
        raise ValueError("relearn needs at least one training fact")
    if not eval_facts:
        raise ValueError("relearn needs at least one held-out fact to evaluate")
    overlap = {f.id for f in train_facts} & {f.id for f in eval_facts}
    if overlap:
        raise ValueError(f"training and held-out facts overlap ({sorted(overlap)[:5]}); pass disjoint splits")

    attacked = copy.deepcopy(model)
    attacked.train()
    for parameter in attacked.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(attacked.parameters(), lr=settings.lr)
    order = random.Random(settings.seed)
    pool: list[Fact] = []

    def evaluate() -> tuple[float, float]:
        attacked.eval()
        scores = score_facts(attacked, eval_facts, description="held-out facts")
        attacked.train()
        return scores.accuracy, scores.mean_target_logprob

    accuracy, logprob = evaluate()
    curve = RelearnCurve(steps=[0], accuracy=[accuracy], target_logprob=[logprob], train_loss=[])
    for step in tqdm(range(1, settings.steps + 1), desc=description, leave=False):
        batch_facts = []
        while len(batch_facts) < min(settings.batch_size, len(train_facts)):
            if not pool:
                pool = list(train_facts)
                order.shuffle(pool)
            batch_facts.append(pool.pop())
        batch = make_batch(attacked, [f.prompt for f in batch_facts], [f.target for f in batch_facts])
        loss = -batch.completion_logprobs(attacked(batch.tokens)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.train_loss.append(float(loss.detach()))
        if step % settings.eval_every == 0 or step == settings.steps:
            accuracy, logprob = evaluate()
            curve.steps.append(step)
            curve.accuracy.append(accuracy)
            curve.target_logprob.append(logprob)
    return curve
