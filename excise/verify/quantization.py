"""Quantization attack: round the weights to 8 or 4 bits and check whether forgotten knowledge returns.

An unlearning method that changes the weights only a little (gradient ascent with a small learning rate) can
leave each weight within half a quantization step of its original value, so rounding maps the edited weights back
onto the original grid and the knowledge returns (Zhang et al., 2024, "Does Your LLM Truly Unlearn? An
Embarrassingly Simple Approach to Recover Unlearned Knowledge"). Users run quantized models routinely, so a deep
edit must survive it. Zeroed neurons and heads stay zero under rounding, so ablations are robust by construction;
the check matters for finetuning-based edits.

Quantization here is per-output-channel symmetric round-to-nearest: each output channel of a weight matrix gets
the scale ``max|W| / (2^(bits-1) - 1)`` over its inputs, and ``W`` becomes ``round(W / scale) * scale``. It runs on
a deep copy; the caller's model is unchanged. Biases, norms and (by default) embeddings stay in full precision,
as in common weight-only schemes. Compare the quantized original too: at 4 bits a small model itself loses
accuracy, and that loss is not forgetting.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.data.facts import Fact
from excise.verify.accuracy import score_facts

# Input axes of each TransformerLens weight; the other axes index output channels.
_INPUT_AXES = {
    "W_Q": (1,),
    "W_K": (1,),
    "W_V": (1,),
    "_W_K": (1,),
    "_W_V": (1,),
    "W_O": (0, 1),
    "W_in": (0,),
    "W_gate": (0,),
    "W_out": (0,),
    "W_E": (1,),  # (d_vocab, d_model): one channel per token
    "W_U": (0,),  # (d_model, d_vocab): one channel per token
}
_EMBEDDING_WEIGHTS = ("W_E", "W_U", "W_pos")


def quantize_tensor(weight: Float[Tensor, ...], bits: int, input_axes: Sequence[int]) -> Float[Tensor, ...]:
    """Round ``weight`` to ``bits``-bit symmetric integers with one scale per output channel; return the result.

    ``input_axes`` are reduced to find each channel's maximum magnitude. A channel of zeros stays zero.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    levels = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=tuple(input_axes), keepdim=True) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(weight / safe).clamp(-levels, levels) * safe).where(scale > 0, torch.zeros_like(weight))


@torch.no_grad()
def quantize_model(model: HookedTransformer, bits: int, *, include_embeddings: bool = False) -> HookedTransformer:
    """Return a deep copy of ``model`` whose weight matrices are quantized to ``bits`` bits per channel.

    Every block's attention and MLP matrices are quantized; the embedding and unembedding only with
    ``include_embeddings``. Hooks added as permanent to ``model`` travel with the copy.
    """
    quantized = copy.deepcopy(model)
    count = 0
    for name, parameter in quantized.named_parameters():
        short = name.rsplit(".", 1)[-1]
        if short not in _INPUT_AXES or (short in _EMBEDDING_WEIGHTS and not include_embeddings):
            continue
        parameter.copy_(quantize_tensor(parameter, bits, _INPUT_AXES[short]))
        count += 1
    if count == 0:
        raise ValueError("found no weight matrix to quantize; is this a HookedTransformer?")
    return quantized


@dataclasses.dataclass(frozen=True)
class QuantizationResult:
    """Accuracy of the quantized model per bit width.

    Attributes:
        bits: Bit widths, with ``None`` for the unquantized model first.
        accuracy: Accuracy at each entry of ``bits``.
        target_logprob: Mean target log-probability (nats) at each entry of ``bits``.
        chance: Chance accuracy.
        n_facts: Facts measured.
    """

    bits: list[int | None]
    accuracy: list[float]
    target_logprob: list[float]
    chance: float
    n_facts: int

    @property
    def best_accuracy(self) -> float:
        """Highest accuracy over the quantized models (not counting the unquantized one)."""
        return max(self.accuracy[1:]) if len(self.accuracy) > 1 else float("nan")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def quantization_attack(
    model: HookedTransformer,
    facts: Sequence[Fact],
    *,
    bits: Sequence[int] = (8, 4),
    include_embeddings: bool = False,
    batch_size: int = 16,
    label: str = "model",
) -> QuantizationResult:
    """Measure accuracy on ``facts`` of ``model`` and of its quantized copies at each bit width."""
    if not facts:
        raise ValueError("quantization_attack needs at least one fact")
    base = score_facts(model, facts, batch_size=batch_size, description=f"unquantized ({label})")
    result = QuantizationResult([None], [base.accuracy], [base.mean_target_logprob], base.chance, len(facts))
    for width in bits:
        quantized = quantize_model(model, width, include_embeddings=include_embeddings)
        scores = score_facts(quantized, facts, batch_size=batch_size, description=f"{width}-bit ({label})")
        result.bits.append(width)
        result.accuracy.append(scores.accuracy)
        result.target_logprob.append(scores.mean_target_logprob)
        del quantized
    return result
