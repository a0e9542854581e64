"""Linear probes: can the forgotten answer still be read from the residual stream, layer by layer?

An edit can stop the model from *saying* an answer while the activations still *contain* it: a late layer
suppresses what earlier layers recalled. A probe trained to read the answer from the residual stream at the last
prompt position finds such hidden knowledge (Belinkov, 2022, "Probing Classifiers"; for unlearning, Lynch et al.,
2024, and Patil et al., 2023, "Can Sensitive Information Be Deleted From LLMs?").

The probe here picks the right choice of a fact. It scores choice ``c`` as ``h^T M u_c``, where ``h`` is the
standardized residual stream, ``u_c`` the unit-norm unembedding vector of the choice's first token and
``M = diag(w) + A B^T`` a diagonal plus rank-``r`` matrix, trained with cross-entropy over each fact's choices.
Because it scores answers through their unembedding vectors, one probe serves every fact, and it is trained and
tested on **disjoint facts**: the test measures whether the answer is readable, not whether the probe memorised
the training facts. With ``M`` the identity it would be a logit lens without the final normalization.

A probe that is too expressive finds structure anywhere. The **control task** (Hewitt and Liang, 2019,
"Designing and Interpreting Probes with Control Tasks") trains the same probe on the same features with each
fact's label replaced by a random choice. Its training accuracy shows the probe's capacity to fit noise; its test
accuracy shows what the probe gets from answer-token priors alone. **Selectivity** is test accuracy minus control
test accuracy. Compare probe accuracy of the edited model with the original's and the twin's: an edited model
whose probe accuracy stays near the original's while its output accuracy fell is hiding the answer.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.data.facts import Fact
from excise.verify.lens import first_token_choices, last_position_residuals


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """Probe size and training budget.

    Attributes:
        rank: Rank ``r`` of the low-rank part of ``M``; 0 for a diagonal probe only.
        steps: Full-batch Adam steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the probe's parameters (AdamW decoupled decay).
        seed: Seed of the initialisation and of the control labels.
    """

    rank: int = 8
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"ProbeSettings.rank must be >= 0, got {self.rank}")
        if self.steps < 1:
            raise ValueError(f"ProbeSettings.steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"ProbeSettings.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"ProbeSettings.weight_decay must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Probe accuracy per residual stream (layer 0 = embedding).

    Attributes:
        layers: Residual stream numbers, as in :mod:`excise.verify.lens`.
        train_accuracy, test_accuracy: Accuracy of the real probe on its training facts and on disjoint test facts.
        control_train_accuracy, control_test_accuracy: The same for the control task (random labels).
        chance: Chance accuracy of the test facts.
        n_train, n_test: Facts used (those with distinct first tokens).
    """

    layers: list[int]
    train_accuracy: list[float]
    test_accuracy: list[float]
    control_train_accuracy: list[float]
    control_test_accuracy: list[float]
    chance: float
    n_train: int
    n_test: int

    @property
    def selectivity(self) -> list[float]:
        """Test accuracy minus control test accuracy, per layer."""
        return [a - b for a, b in zip(self.test_accuracy, self.control_test_accuracy, strict=True)]

    @property
    def best_test_accuracy(self) -> float:
        """Highest test accuracy over layers."""
        return max(self.test_accuracy) if self.test_accuracy else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "selectivity": self.selectivity}


class ChoiceProbe(nn.Module):
    """Scores ``h^T (diag(w) + A B^T) u_c`` for each choice ``c``; see the module docstring."""

    def __init__(self, d_model: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d_model))
        self.A = nn.Parameter(torch.randn(d_model, rank, generator=generator) / d_model**0.5)
        self.B = nn.Parameter(torch.zeros(d_model, rank))

    def forward(
        self, features: Float[Tensor, "fact d_model"], choices: Float[Tensor, "fact choice d_model"]
    ) -> Float[Tensor, "fact choice"]:
        diagonal = torch.einsum("fd,d,fcd->fc", features, self.w, choices)
        low_rank = torch.einsum("fr,fcr->fc", features @ self.A, choices @ self.B)
        return diagonal + low_rank


def probe_layers(
    model: HookedTransformer,
    train_facts: Sequence[Fact],
    test_facts: Sequence[Fact],
    settings: ProbeSettings = ProbeSettings(),
    *,
    batch_size: int = 16,
    label: str = "model",
) -> ProbeResult:
    """Train a choice probe and its control on ``train_facts`` at every residual stream; test on ``test_facts``.

    Args:
        model: Any HookedTransformer with a tokenizer; hook-based edits apply when active during the call.
        train_facts, test_facts: Disjoint fact sets (ids must not overlap).
        settings: Probe size and training budget.
        batch_size: Facts per forward pass when reading residual streams.
        label: Name of the model in progress bars.
    """
    overlap = {f.id for f in train_facts} & {f.id for f in test_facts}
    if overlap:
        raise ValueError(f"probe training and test facts overlap ({sorted(overlap)[:5]}); pass disjoint splits")
    train_kept, train_tokens = first_token_choices(model, train_facts)
    test_kept, test_tokens = first_token_choices(model, test_facts)
    if len(train_kept) < 2 or not test_kept:
        raise ValueError(
            f"probes need at least 2 training facts and 1 test fact with distinct first tokens per choice, got "
            f"{len(train_kept)} and {len(test_kept)}"
        )
    train_res = last_position_residuals(model, train_kept, batch_size=batch_size, description=f"probe data ({label})")
    test_res = last_position_residuals(model, test_kept, batch_size=batch_size, description=f"probe data ({label})")
    unembed = model.W_U.detach().float().cpu().T  # (d_vocab, d_model)
    unembed = unembed / unembed.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    train_choices, train_valid = _choice_vectors(unembed, train_tokens)
    test_choices, test_valid = _choice_vectors(unembed, test_tokens)
    train_labels = torch.zeros(len(train_kept), dtype=torch.long)
    test_labels = torch.zeros(len(test_kept), dtype=torch.long)
    rng = random.Random(settings.seed)
    control_train = torch.tensor([rng.randrange(len(tokens)) for tokens in train_tokens])
    control_test = torch.tensor([rng.randrange(len(tokens)) for tokens in test_tokens])

    result = ProbeResult([], [], [], [], [], _chance(test_tokens), len(train_kept), len(test_kept))
    for layer in tqdm(range(train_res.shape[0]), desc=f"probes ({label})", leave=False):
        mean = train_res[layer].mean(0)
        std = train_res[layer].std(0).clamp_min(1e-6)
        train_x = (train_res[layer] - mean) / std
        test_x = (test_res[layer] - mean) / std
        for labels_train, labels_test, train_out, test_out in (
            (train_labels, test_labels, result.train_accuracy, result.test_accuracy),
            (control_train, control_test, result.control_train_accuracy, result.control_test_accuracy),
        ):
            probe = _fit(train_x, train_choices, train_valid, labels_train, settings)
            with torch.no_grad():
                train_out.append(_accuracy(probe(train_x, train_choices), train_valid, labels_train))
                test_out.append(_accuracy(probe(test_x, test_choices), test_valid, labels_test))
        result.layers.append(layer)
    return result


def _fit(
    features: Float[Tensor, "fact d_model"],
    choices: Float[Tensor, "fact choice d_model"],
    valid: Tensor,
    labels: Int[Tensor, " fact"],
    settings: ProbeSettings,
) -> ChoiceProbe:
    generator = torch.Generator().manual_seed(settings.seed)
    probe = ChoiceProbe(features.shape[1], settings.rank, generator)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    with torch.enable_grad():
        for _ in range(settings.steps):
            scores = probe(features, choices).masked_fill(~valid, float("-inf"))
            loss = nn.functional.cross_entropy(scores, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe


def _choice_vectors(
    unembed: Float[Tensor, "d_vocab d_model"], tokens: Sequence[Sequence[int]]
) -> tuple[Float[Tensor, "fact choice d_model"], Tensor]:
    width = max(len(row) for row in tokens)
    index = torch.zeros(len(tokens), width, dtype=torch.long)
    valid = torch.zeros(len(tokens), width, dtype=torch.bool)
    for row, ids in enumerate(tokens):
        index[row, : len(ids)] = torch.tensor(ids)
        valid[row, : len(ids)] = True
    return unembed[index], valid


def _accuracy(scores: Float[Tensor, "fact choice"], valid: Tensor, labels: Int[Tensor, " fact"]) -> float:
    scores = scores.masked_fill(~valid, float("-inf"))
    label_scores = scores.gather(1, labels.unsqueeze(1))
    # Ties count as wrong, as in likelihood ranking: the label must beat every other choice.
    others = scores.masked_fill(torch.nn.functional.one_hot(labels, scores.shape[1]).bool(), float("-inf"))
    return float((label_scores.squeeze(1) > others.max(1).values).float().mean())


def _chance(tokens: Sequence[Sequence[int]]) -> float:
    return float(np.mean([1.0 / len(row) for row in tokens])) if tokens else float("nan")
