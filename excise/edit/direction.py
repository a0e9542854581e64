"""Direction removal: project one direction out of everything that writes to the residual stream.

A concept that the model represents linearly (Park et al., 2023, "The Linear Representation Hypothesis") can be
removed by taking the component along its direction ``v`` out of the residual stream. Because the residual stream
is the sum of the writes of the embeddings, every attention layer and every MLP layer, projecting ``v`` out of each
write is the same as projecting it out of the stream at every layer. In weight form each writing matrix ``W`` whose
output lives in ``d_model`` (``W_E``, ``W_pos``, ``W_O``, ``W_out``, and the biases ``b_O``, ``b_out``) becomes
``W (I - v v^T)``; this is the weight orthogonalization of Arditi et al. (2024), "Refusal in Language Models Is
Mediated by a Single Direction". The hook form applies the same projection to each write's hook
(``hook_embed``, ``hook_pos_embed``, ``blocks.L.hook_attn_out``, ``blocks.L.hook_mlp_out``), so both forms give the
same logits.

With ``scale`` other than 0 the component is multiplied by ``scale`` instead of removed (``-1`` reflects it), which
is still linear and so still exact in weight form.

The direction can come from:

- :func:`mean_difference_direction`: the difference of the mean activations on two sets of texts (e.g. forget
  versus retain prompts), the simplest concept direction;
- :func:`probe_direction`: the weight vector of a logistic-regression probe separating the two sets;
- :func:`given_direction`: any vector, e.g. a row of an SAE decoder.

Warning:
    Removing a direction from the writes of only some layers (``layers=...``) leaves the direction written by the
    other layers in the stream. With ``layers`` set to every layer and ``embeddings=True``, components that read
    the residual stream never see the direction, but the unembedding ``W_U`` is not changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.completions import make_text_batch
from excise.edit.base import Edit, ForwardHook, model_signature

logger = logging.getLogger(__name__)

DirectionMethod = Literal["mean_difference", "probe", "given"]
DIRECTION_METHODS: tuple[DirectionMethod, ...] = get_args(DirectionMethod)
Position = Literal["last", "mean"]
POSITIONS: tuple[Position, ...] = get_args(Position)


@dataclasses.dataclass(frozen=True)
class Direction:
    """A unit vector in the residual stream and where it came from.

    Attributes:
        vector: Unit-norm direction in ``d_model``, on the CPU in float32.
        method: How it was found.
        hook: The hook whose activations it was fitted on, if any.
        settings: Method settings and fit statistics (probe accuracy, norm of the mean difference).
    """

    vector: Float[Tensor, " d_model"]
    method: DirectionMethod
    hook: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in DIRECTION_METHODS:
            raise ValueError(f"Direction.method must be one of {DIRECTION_METHODS}, got {self.method!r}")
        if self.vector.ndim != 1:
            raise ValueError(f"Direction.vector must be 1-D, got shape {tuple(self.vector.shape)}")


def given_direction(vector: Tensor, *, hook: str | None = None) -> Direction:
    """Wrap any vector (an SAE decoder row, a steering vector) as a unit :class:`Direction`."""
    return Direction(_unit(vector, "the given vector"), "given", hook)


@torch.no_grad()
def hook_activations(
    model: HookedTransformer,
    hook: str,
    texts: Sequence[str],
    *,
    position: Position = "last",
    batch_size: int = 16,
) -> Float[Tensor, "text d_model"]:
    """Activation of ``hook`` for each text at its last real token, or averaged over its tokens, on the CPU."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if hook not in model.hook_dict:
        raise ValueError(f"hook {hook!r} not found in the model; see model.hook_dict for valid names")
    if not texts:
        raise ValueError("hook_activations needs at least one text")
    rows = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"activations at {hook}", leave=False):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size])
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        activation = cache[hook].float()
        if activation.ndim != 3:
            raise ValueError(f"hook {hook!r} has shape {tuple(activation.shape)}; use a (batch, pos, d) hook")
        if position == "last":
            rows.append(activation[torch.arange(len(lengths)), lengths - 1].cpu())
        else:
            mask = (torch.arange(tokens.shape[1], device=lengths.device) < lengths.unsqueeze(1)).float()
            summed = (activation * mask.unsqueeze(-1)).sum(1)
            rows.append((summed / lengths.unsqueeze(1)).cpu())
    return torch.cat(rows)


def mean_difference_direction(
    model: HookedTransformer,
    hook: str,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    position: Position = "last",
    batch_size: int = 16,
) -> Direction:
    """Direction from the mean activation on ``negative`` texts to the mean on ``positive`` texts, at ``hook``."""
    positive_mean = hook_activations(model, hook, positive, position=position, batch_size=batch_size).mean(0)
    negative_mean = hook_activations(model, hook, negative, position=position, batch_size=batch_size).mean(0)
    difference = positive_mean - negative_mean
    settings = {"position": position, "n_positive": len(positive), "n_negative": len(negative)}
    settings["difference_norm"] = float(difference.norm())
    return Direction(_unit(difference, "the difference of means"), "mean_difference", hook, settings)


def probe_direction(
    model: HookedTransformer,
    hook: str,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    position: Position = "last",
    l2: float = 1e-2,
    max_iter: int = 200,
    batch_size: int = 16,
) -> Direction:
    """Weight vector of a logistic-regression probe that tells ``positive`` from ``negative`` texts at ``hook``.

    Activations are standardised before fitting and the weights mapped back, so ``l2`` (the L2 penalty on the
    standardised weights) does not depend on the scale of the residual stream. ``settings["train_accuracy"]`` is
    measured on the fitting texts: an estimate of separability, not held-out accuracy.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    features = torch.cat(
        [
            hook_activations(model, hook, positive, position=position, batch_size=batch_size),
            hook_activations(model, hook, negative, position=position, batch_size=batch_size),
        ]
    ).double()
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    standardized = (features - mean) / std
    weight = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = standardized @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        accuracy = float(((standardized @ weight + bias > 0).double() == labels).double().mean())
    raw_weight = (weight.detach() / std).float()
    settings = {"position": position, "l2": l2, "train_accuracy": accuracy, "n_positive": len(positive)}
    settings["n_negative"] = len(negative)
    return Direction(_unit(raw_weight, "the probe weights"), "probe", hook, settings)


class DirectionRemoval(Edit):
    """Remove (or rescale) the component along one direction in every selected write to the residual stream.

    Build one with :func:`remove_direction`.

    Attributes:
        direction: The direction, with its provenance.
        writers: Hook names of the writes that are projected: ``hook_embed``, ``hook_pos_embed``,
            ``blocks.L.hook_attn_out``, ``blocks.L.hook_mlp_out``.
        scale: Factor applied to the component along the direction; 0 removes it.
    """

    kind = "direction"

    def __init__(
        self,
        direction: Direction,
        writers: Sequence[str],
        scale: float = 0.0,
        signature: dict[str, Any] | None = None,
    ) -> None:
        if not writers:
            raise ValueError("a DirectionRemoval needs at least one writer hook")
        for writer in writers:
            _writer_weights(writer)  # raises on hooks that are not residual-stream writes
        norm = float(direction.vector.norm())
        if abs(norm - 1.0) > 1e-4:
            raise ValueError(f"the direction must have unit norm, got norm {norm:.6g}; build it with given_direction")
        self.direction = direction
        self.writers = tuple(writers)
        self.scale = float(scale)
        self.signature = signature

    def forward_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        vector = self.direction.vector.to(model.cfg.device)
        factor = self.scale - 1.0

        def project(activation: Tensor, hook: HookPoint) -> Tensor:
            unit = vector.to(activation.dtype)
            return activation + factor * (activation @ unit).unsqueeze(-1) * unit

        return [(writer, project) for writer in self.writers]

    @torch.no_grad()
    def bake(self, model: HookedTransformer) -> None:
        factor = self.scale - 1.0
        for writer in self.writers:
            for name in _writer_weights(writer):
                parameter = model.get_parameter(name)
                unit = self.direction.vector.to(device=parameter.device, dtype=parameter.dtype)
                # Every writer's last axis is d_model, so (W v) v^T acts on it alone.
                parameter += factor * (parameter @ unit).unsqueeze(-1) * unit

    def describe(self) -> pd.DataFrame:
        rows = []
        for writer in self.writers:
            layer = int(writer.split(".")[1]) if writer.startswith("blocks.") else None
            for weight in _writer_weights(writer):
                rows.append(
                    {
                        "hook": writer,
                        "layer": layer,
                        "weight": weight,
                        "operation": "remove direction" if self.scale == 0 else f"scale direction by {self.scale:g}",
                        "direction": self.direction.method,
                    }
                )
        return pd.DataFrame(rows)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config = {
            "writers": list(self.writers),
            "scale": self.scale,
            "method": self.direction.method,
            "source_hook": self.direction.hook,
            "settings": self.direction.settings,
        }
        return config, {"vector": self.direction.vector}

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> DirectionRemoval:
        direction = Direction(tensors["vector"], config["method"], config["source_hook"], config["settings"])
        return cls(direction, config["writers"], config["scale"])

    def __repr__(self) -> str:
        return f"DirectionRemoval(method={self.direction.method!r}, writers={len(self.writers)}, scale={self.scale})"


def residual_writers(
    model: HookedTransformer, layers: Sequence[int] | None = None, embeddings: bool = True
) -> list[str]:
    """Hook names of the writes to the residual stream: embeddings, then attention and MLP output per layer."""
    selected = range(model.cfg.n_layers) if layers is None else layers
    writers = []
    if embeddings:
        writers.append("hook_embed")
        if model.cfg.positional_embedding_type == "standard":
            writers.append("hook_pos_embed")
    for layer in selected:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
        writers.append(f"blocks.{layer}.hook_attn_out")
        if not model.cfg.attn_only:
            writers.append(f"blocks.{layer}.hook_mlp_out")
    return writers


def remove_direction(
    model: HookedTransformer,
    direction: Direction | Tensor,
    *,
    layers: Sequence[int] | None = None,
    embeddings: bool = True,
    scale: float = 0.0,
) -> DirectionRemoval:
    """Build a :class:`DirectionRemoval` of ``direction`` from the writes of ``layers`` (default: all).

    Args:
        model: The model the edit is made for.
        direction: A :class:`Direction` or a plain ``d_model`` vector (normalised here).
        layers: Layers whose attention and MLP outputs are projected; None for every layer.
        embeddings: Also project the token (and learned position) embeddings.
        scale: Factor on the component along the direction: 0 removes it, -1 reflects it.
    """
    if not isinstance(direction, Direction):
        direction = given_direction(direction)
    if direction.vector.shape != (model.cfg.d_model,):
        raise ValueError(
            f"direction has shape {tuple(direction.vector.shape)} but the model's residual stream has "
            f"d_model={model.cfg.d_model}"
        )
    if model.cfg.parallel_attn_mlp and not model.cfg.attn_only:
        logger.info("parallel attention and MLP: both outputs are projected, which is still exact")
    writers = residual_writers(model, layers, embeddings)
    return DirectionRemoval(direction, writers, scale, signature=model_signature(model))


def _writer_weights(writer: str) -> tuple[str, ...]:
    """Parameter names whose output is the residual write at hook ``writer``."""
    if writer == "hook_embed":
        return ("embed.W_E",)
    if writer == "hook_pos_embed":
        return ("pos_embed.W_pos",)
    parts = writer.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        if parts[2] == "hook_attn_out":
            return (f"blocks.{parts[1]}.attn.W_O", f"blocks.{parts[1]}.attn.b_O")
        if parts[2] == "hook_mlp_out":
            return (f"blocks.{parts[1]}.mlp.W_out", f"blocks.{parts[1]}.mlp.b_out")
    raise ValueError(
        f"{writer!r} is not a residual-stream write; use hook_embed, hook_pos_embed, blocks.L.hook_attn_out or "
        "blocks.L.hook_mlp_out"
    )


def _unit(vector: Tensor, what: str) -> Tensor:
    vector = vector.detach().float().cpu()
    norm = float(vector.norm())
    if not norm > 1e-12:
        raise ValueError(f"{what} has norm {norm:.3g}; a direction needs a non-zero vector")
    return vector / norm
