"""Finetuning relearning attack: how fast does forgotten knowledge come back under a little training?

The attacker finetunes the model on one split of the forget facts (prompt followed by target, next-token loss on
the target) and watches accuracy on the other, held-out split. Knowledge that was only suppressed returns on the
held-out facts within a few steps, because training on related facts undoes the suppression; knowledge that was
removed has to be learned fact by fact and does not transfer (Lynch et al., 2024, "Eight Methods to Evaluate
Robust Unlearning in LLMs"; Deeb and Roger, 2024, "Do Unlearning Methods Remove Information from LLM Weights?").

Two more attackers share the same loop:

- **LoRA** (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): only a low-rank update
  ``A @ B`` of chosen weight matrices is trained (``method="lora"``), the cheap finetuning an outside attacker
  would run. ``B`` starts at zero, so the attacked model starts exactly at the edited one.
- **Text** instead of facts (:func:`relearn_text`): next-token loss on free text, either forget-domain text or
  unrelated benign text. Finetuning on benign text is known to undo safety training (Qi et al., 2023,
  "Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend To"), and to bring back
  unlearned knowledge (Lynch et al., 2024).

The attack runs on a deep copy, so the caller's model is never trained. Compare curves of the edited model and
the original under the same budget (steps, learning rate, batch size, data, seed).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import _pad_id as pad_id_of
from excise.completions import make_batch, tokenize_prompt
from excise.data.facts import Fact
from excise.verify.accuracy import score_facts
from excise.verify.summary import steps_to_fraction

RelearnMethod = Literal["full", "lora"]
RELEARN_METHODS: tuple[RelearnMethod, ...] = get_args(RelearnMethod)
LoraTarget = Literal["W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_gate"]
LORA_TARGETS: tuple[LoraTarget, ...] = get_args(LoraTarget)


@dataclasses.dataclass(frozen=True)
class RelearnSettings:
    """The attacker's budget.

    Attributes:
        steps: Optimizer steps.
        lr: Adam learning rate. Small models forget and relearn at very different rates; 1e-5 to 1e-4 is usual
            for full finetuning of a 100M-parameter model, 1e-4 to 1e-3 for LoRA.
        batch_size: Training facts (or text chunks) per step, drawn in a fixed shuffled order that cycles.
        eval_every: Measure held-out accuracy every this many steps (always at 0 and at the last step).
        seed: Seed of the data order and of the LoRA initialisation.
        method: ``"full"`` trains every parameter, ``"lora"`` only low-rank updates of ``lora_targets``.
        lora_rank: Rank of each LoRA update.
        lora_alpha: LoRA scale numerator; the update is ``(lora_alpha / lora_rank) * A @ B``.
        lora_targets: Weight matrices of every block that get a LoRA update (TransformerLens names). Attention
            matrices are treated as one ``d_model x (n_heads * d_head)`` matrix (``W_O`` the other way round), as
            LoRA treats ``q_proj``; ``W_gate`` exists only in gated MLPs and is skipped elsewhere.
        max_tokens: For text relearning, the length in tokens of the chunks texts are cut into.
    """

    steps: int = 20
    lr: float = 3e-5
    batch_size: int = 8
    eval_every: int = 2
    seed: int = 0
    method: RelearnMethod = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[LoraTarget, ...] = ("W_Q", "W_V", "W_in", "W_out")
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RelearnSettings.steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"RelearnSettings.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"RelearnSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.eval_every < 1:
            raise ValueError(f"RelearnSettings.eval_every must be >= 1, got {self.eval_every}")
        if self.method not in RELEARN_METHODS:
            raise ValueError(f"RelearnSettings.method must be one of {RELEARN_METHODS}, got {self.method!r}")
        if self.lora_rank < 1:
            raise ValueError(f"RelearnSettings.lora_rank must be >= 1, got {self.lora_rank}")
        unknown = [target for target in self.lora_targets if target not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise ValueError(
                f"RelearnSettings.lora_targets must be a non-empty subset of {LORA_TARGETS}, got {self.lora_targets}"
            )
        if self.max_tokens < 2:
            raise ValueError(f"RelearnSettings.max_tokens must be >= 2, got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class RelearnCurve:
    """Held-out accuracy during a relearning attack.

    Attributes:
        steps: Optimizer steps at which accuracy was measured (starting at 0).
        accuracy: Held-out accuracy at each of ``steps``.
        target_logprob: Mean held-out target log-probability (nats) at each of ``steps``.
        train_loss: Training loss at every step (1-based step ``i`` at index ``i - 1``).
        method: ``"full"`` or ``"lora"``.
        data: ``"facts"`` or ``"text"``.
        trained_parameters: Number of trained parameters.
    """

    steps: list[int]
    accuracy: list[float]
    target_logprob: list[float]
    train_loss: list[float]
    method: str = "full"
    data: str = "facts"
    trained_parameters: int = 0

    def steps_to_fraction(self, original: float, fraction: float = 0.5) -> int | None:
        """First step at which ``fraction`` of ``original - accuracy[0]`` is regained; see :mod:`summary`."""
        return steps_to_fraction(self.steps, self.accuracy, original, fraction=fraction)

    def to_dict(self) -> dict[str, object]:
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

    With ``settings.method == "full"`` every parameter of the copy is trained with Adam; with ``"lora"`` only
    LoRA updates are. The loss is the summed negative log-probability of each fact's target after its prompt,
    averaged over the batch. ``model`` itself is not changed.
    """
    if not train_facts:
        raise ValueError("relearn needs at least one training fact")
    _check_eval(eval_facts)
    overlap = {f.id for f in train_facts} & {f.id for f in eval_facts}
    if overlap:
        raise ValueError(f"training and held-out facts overlap ({sorted(overlap)[:5]}); pass disjoint splits")

    def loss_of(attacked: HookedTransformer, batch_facts: list[Fact]) -> Tensor:
        batch = make_batch(attacked, [f.prompt for f in batch_facts], [f.target for f in batch_facts])
        return -batch.score(attacked).mean()

    return _attack(model, list(train_facts), loss_of, eval_facts, settings, "facts", description)


def relearn_text(
    model: HookedTransformer,
    texts: Sequence[str],
    eval_facts: Sequence[Fact],
    settings: RelearnSettings = RelearnSettings(),
    *,
    description: str = "relearning on text",
) -> RelearnCurve:
    """Finetune a copy of ``model`` on free text and record accuracy on ``eval_facts``.

    Texts are tokenized in order and cut into chunks of at most ``settings.max_tokens`` tokens (fewer when the
    model's context is shorter), up to the
    ``steps * batch_size`` chunks the attack can use. Each step trains on ``settings.batch_size`` chunks with the
    mean next-token loss over their real tokens. The caller decides what the text is: forget-domain text (does
    related text bring the facts back?) or benign text unrelated to the domain (does any finetuning undo the
    edit?). Text that states the held-out facts outright teaches them; compare with the twin under the same text.
    """
    # Tokenize only as many chunks as the attack can use, so a large corpus costs nothing extra.
    chunks = _text_chunks(
        model, texts, min(settings.max_tokens, model.cfg.n_ctx), limit=settings.steps * settings.batch_size
    )
    _check_eval(eval_facts)
    pad = pad_id_of(model)

    def loss_of(attacked: HookedTransformer, batch_chunks: list[list[int]]) -> Tensor:
        width = max(len(chunk) for chunk in batch_chunks)
        tokens = torch.full((len(batch_chunks), width), pad, dtype=torch.long)
        for row, chunk in enumerate(batch_chunks):
            tokens[row, : len(chunk)] = torch.tensor(chunk)
        tokens = tokens.to(attacked.cfg.device)
        lengths = torch.tensor([len(chunk) for chunk in batch_chunks], device=tokens.device)
        log_probs = attacked(tokens).log_softmax(-1)[:, :-1]
        token_log_probs = log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(1, width, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        return -(token_log_probs * mask).sum() / mask.sum()

    return _attack(model, chunks, loss_of, eval_facts, settings, "text", description)


def add_lora(model: HookedTransformer, settings: RelearnSettings) -> list[nn.Parameter]:
    """Freeze ``model`` and give the chosen matrices of every block a trainable LoRA update, in place.

    Returns the LoRA parameters. Use it on a copy: the model keeps the parametrizations afterwards.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(settings.seed)
    trained: list[nn.Parameter] = []
    for block in model.blocks:
        for target in settings.lora_targets:
            module, name = _lora_site(block, target)
            if module is None:
                continue
            weight = getattr(module, name)
            delta = _LoraDelta(weight, target, settings.lora_rank, settings.lora_alpha, generator)
            parametrize.register_parametrization(module, name, delta)
            trained.extend([delta.A, delta.B])
    if not trained:
        raise ValueError(f"no weight matrix matches lora_targets {settings.lora_targets} in this model")
    return trained


class _LoraDelta(nn.Module):
    """A parametrization that returns ``weight + scale * A @ B`` reshaped to the weight's TransformerLens layout."""

    def __init__(self, weight: Tensor, target: str, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.target = target
        if target in ("W_Q", "W_K", "W_V"):  # (head_index, d_model, d_head): input is d_model
            d_in, d_out = weight.shape[1], weight.shape[0] * weight.shape[2]
        elif target == "W_O":  # (head_index, d_head, d_model): input is head_index * d_head
            d_in, d_out = weight.shape[0] * weight.shape[1], weight.shape[2]
        else:  # (d_in, d_out)
            d_in, d_out = weight.shape
        self.scale = alpha / rank
        initial = torch.randn(d_in, rank, generator=generator) / math.sqrt(d_in)
        self.A = nn.Parameter(initial.to(device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(rank, d_out, device=weight.device, dtype=weight.dtype))

    def forward(self, weight: Tensor) -> Tensor:
        delta = self.scale * (self.A @ self.B)
        if self.target in ("W_Q", "W_K", "W_V"):
            n_heads, d_model, d_head = weight.shape
            delta = delta.reshape(d_model, n_heads, d_head).permute(1, 0, 2)
        else:
            delta = delta.reshape(weight.shape)
        return weight + delta


def _lora_site(block: nn.Module, target: str) -> tuple[nn.Module | None, str]:
    if target in ("W_in", "W_out", "W_gate"):
        mlp = getattr(block, "mlp", None)
        return (mlp, target) if mlp is not None and isinstance(getattr(mlp, target, None), nn.Parameter) else (None, "")
    attn = block.attn
    if not isinstance(attn, nn.Module):
        return None, ""
    # Grouped-query attention stores keys and values per key/value head as _W_K / _W_V; W_K is a property.
    for name in (f"_{target}", target):
        if isinstance(attn._parameters.get(name), nn.Parameter):
            return attn, name
    return None, ""


def _attack(
    model: HookedTransformer,
    items: list,
    loss_of: Callable[[HookedTransformer, list], Tensor],
    eval_facts: Sequence[Fact],
    settings: RelearnSettings,
    data: str,
    description: str,
) -> RelearnCurve:
    attacked = copy.deepcopy(model)
    if settings.method == "lora":
        parameters = add_lora(attacked, settings)
    else:
        parameters = list(attacked.parameters())
        for parameter in parameters:
            parameter.requires_grad_(True)
    attacked.train()
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    order = random.Random(settings.seed)
    pool: list = []

    def evaluate() -> tuple[float, float]:
        attacked.eval()
        scores = score_facts(attacked, eval_facts, description="held-out facts")
        attacked.train()
        return scores.accuracy, scores.mean_target_logprob

    accuracy, logprob = evaluate()
    curve = RelearnCurve(
        steps=[0],
        accuracy=[accuracy],
        target_logprob=[logprob],
        train_loss=[],
        method=settings.method,
        data=data,
        trained_parameters=sum(p.numel() for p in parameters),
    )
    for step in tqdm(range(1, settings.steps + 1), desc=description, leave=False):
        batch_items = []
        while len(batch_items) < min(settings.batch_size, len(items)):
            if not pool:
                pool = list(items)
                order.shuffle(pool)
            batch_items.append(pool.pop())
        loss = loss_of(attacked, batch_items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.train_loss.append(loss.item())
        if step % settings.eval_every == 0 or step == settings.steps:
            accuracy, logprob = evaluate()
            curve.steps.append(step)
            curve.accuracy.append(accuracy)
            curve.target_logprob.append(logprob)
    return curve


def _text_chunks(model: HookedTransformer, texts: Sequence[str], max_tokens: int, limit: int) -> list[list[int]]:
    chunks: list[list[int]] = []
    for text in texts:
        if len(chunks) >= limit:
            break
        if not text.strip():
            continue
        ids = tokenize_prompt(model, text)
        pieces = (ids[start : start + max_tokens] for start in range(0, len(ids), max_tokens))
        chunks.extend(piece for piece in pieces if len(piece) >= 2)
    chunks = chunks[:limit]
    if not chunks:
        raise ValueError("relearn_text needs at least one text of two or more tokens")
    return chunks


def _check_eval(eval_facts: Sequence[Fact]) -> None:
    if not eval_facts:
        raise ValueError("relearn needs at least one held-out fact to evaluate")
