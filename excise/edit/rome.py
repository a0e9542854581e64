"""ROME: rank-one model editing of one fact in one MLP layer (Meng et al., 2022, "Locating and Editing Factual
Associations in GPT").

ROME writes a new value ``v* = v + delta`` for the subject's key ``k*`` into ``W_out`` of one layer with the
smallest change that keeps the outputs for other keys, weighted by their uncentred covariance ``C``::

    W_out' = W_out + u delta^T,    u = C^{-1} k* / (k*^T C^{-1} k*)

so that ``k*^T W_out' = k*^T W_out + delta`` exactly (TransformerLens multiplies ``k^T W_out``, with ``W_out`` of
shape ``(d_mlp, d_model)``). ``delta`` comes from :func:`excise.edit.rewrite.optimize_delta`; for a rewrite it
makes the model predict the new target, and with ``new_target=None`` it makes the attribute unknown.

Guard against updates that blow up: for a generic key ``k`` with covariance ``C``, the update adds
``(k^T u) delta``, and ``E[(k^T u)^2] = 1 / (k*^T C^{-1} k*)``. A small denominator ``k*^T C^{-1} k*`` therefore means
that unrelated inputs receive a large part of ``delta``; :func:`rome` raises :class:`EditRejectedError` when the
root-mean-square spill-over ``1 / sqrt(k*^T C^{-1} k*)`` exceeds ``max_spillover``, or when the update is large
relative to ``W_out``.

Warning:
    The key covariance is estimated on generic text (see :func:`excise.edit.rewrite.key_second_moment`) and
    damped by ``damping * mean(diag C)`` so that it is invertible with few tokens; a larger ``damping`` spreads the
    update towards ``k*`` itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.edit.base import model_signature
from excise.edit.rewrite import (
    DEFAULT_PREFIXES,
    DeltaSettings,
    EditRejectedError,
    RewriteRequest,
    damped,
    key_second_moment,
    optimize_delta,
    subject_keys,
)
from excise.edit.sequence import EditSequence
from excise.edit.weights import WeightDelta

logger = logging.getLogger(__name__)


def rome(
    model: HookedTransformer,
    request: RewriteRequest,
    layer: int | None = None,
    *,
    second_moment: Tensor | None = None,
    corpus: Sequence[str] | None = None,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    settings: DeltaSettings | None = None,
    damping: float = 1e-3,
    max_spillover: float = 0.5,
    max_relative_update: float = 1.0,
) -> WeightDelta:
    """Compute a ROME edit of ``model`` for one request; the model is not changed.

    Args:
        model: The model to edit.
        request: The fact and its new target (None makes it unknown).
        layer: MLP layer to edit; default :func:`default_layer`.
        second_moment: ``E[k k^T]`` of the layer's keys; default computed (or read from the cache) by
            :func:`excise.edit.rewrite.key_second_moment` on ``corpus``.
        corpus: Generic texts for the key statistics when ``second_moment`` is None.
        prefixes: Context prefixes the key is averaged over.
        settings: Settings of the ``delta`` optimisation.
        damping: Ridge added to ``C`` relative to its mean diagonal.
        max_spillover: Reject when ``1 / sqrt(k*^T C^{-1} k*)`` exceeds this.
        max_relative_update: Reject when ``|u delta^T| / |W_out|`` (Frobenius) exceeds this.

    Returns:
        A rank-one :class:`WeightDelta` on ``blocks.L.mlp.W_out`` whose ``info`` contains the denominator, the
        spill-over, the relative update norm and the optimisation statistics.

    Raises:
        EditRejectedError: The update would blow up (see the module docstring).
    """
    layer = default_layer(model) if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
    if second_moment is None:
        second_moment = key_second_moment(model, [layer], corpus)[layer]
    key = subject_keys(model, layer, [request], prefixes)[0]
    delta, delta_stats = optimize_delta(model, layer, request, prefixes, settings)
    weight = model.blocks[layer].mlp.W_out.detach().float().cpu()
    left, right, stats = rank_one_update(
        key,
        delta,
        second_moment,
        weight,
        damping=damping,
        max_spillover=max_spillover,
        max_relative_update=max_relative_update,
    )
    info = {"layer": layer, "request": request.to_dict(), "damping": damping, **stats, **delta_stats}
    logger.info("ROME edit of %r at layer %d: %s", request.fact.id, layer, stats)
    return WeightDelta(
        low_rank={f"blocks.{layer}.mlp.W_out": (left, right)},
        method="rome",
        info=info,
        signature=model_signature(model),
    )


def rome_in_turn(
    model: HookedTransformer,
    requests: Sequence[RewriteRequest],
    layer: int | None = None,
    *,
    second_moment: Tensor | None = None,
    corpus: Sequence[str] | None = None,
    **options: Any,
) -> EditSequence:
    """Compute one ROME edit per request, each on the model with the previous edits applied.

    ROME changes one fact per edit; applied in turn, later edits see the weights the earlier ones left, as in
    sequential model editing. For many facts at once, :func:`excise.edit.memit` spreads the change over several
    layers instead. The model is not changed.

    Args:
        model: The model to edit.
        requests: The facts and their new targets, in the order they are applied.
        layer: MLP layer to edit; default :func:`default_layer`.
        second_moment: ``E[k k^T]`` of the layer's keys on the unedited model, used for every edit; default
            computed (or read from the cache) on ``corpus``.
        corpus: Generic texts for the key statistics when ``second_moment`` is None.
        options: Further keyword arguments of :func:`rome` (``prefixes``, ``settings``, the guard limits).

    Raises:
        EditRejectedError: One of the updates would blow up; no edit is returned.
    """
    if not requests:
        raise ValueError("rome_in_turn needs at least one RewriteRequest")
    layer = default_layer(model) if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
    if second_moment is None:
        second_moment = key_second_moment(model, [layer], corpus)[layer]
    edits = []
    current = model
    for request in requests:
        step = rome(current, request, layer, second_moment=second_moment, **options)
        edits.append(step)
        current = step.apply(current)
    return EditSequence(tuple(edits))


def rank_one_update(
    key: Float[Tensor, " d_mlp"],
    delta: Float[Tensor, " d_model"],
    second_moment: Float[Tensor, "d_mlp d_mlp"],
    weight: Float[Tensor, "d_mlp d_model"],
    *,
    damping: float = 1e-3,
    max_spillover: float = 0.5,
    max_relative_update: float = 1.0,
) -> tuple[Float[Tensor, "d_mlp 1"], Float[Tensor, "1 d_model"], dict[str, float]]:
    """ROME's closed form ``u = C^{-1} k / (k^T C^{-1} k)``, checked; returns ``(u, delta)`` as factors and stats.

    Raises:
        EditRejectedError: The denominator is not positive and finite, the spill-over onto generic keys exceeds
            ``max_spillover``, or the update norm relative to ``weight`` exceeds ``max_relative_update``.
    """
    if key.shape[0] != second_moment.shape[0] or weight.shape != (key.shape[0], delta.shape[0]):
        raise ValueError(
            f"shapes do not match: key {tuple(key.shape)}, delta {tuple(delta.shape)}, second moment "
            f"{tuple(second_moment.shape)}, weight {tuple(weight.shape)}"
        )
    covariance = damped(second_moment, damping)
    key64 = key.double()
    solved = torch.linalg.solve(covariance, key64)  # C^{-1} k
    denominator = float(key64 @ solved)
    if not math.isfinite(denominator) or denominator <= 0:
        raise EditRejectedError(
            f"ROME denominator k^T C^-1 k = {denominator:.3g} is not positive and finite: the key statistics are "
            "broken or the key is zero; recompute the statistics or raise damping"
        )
    spillover = 1.0 / math.sqrt(denominator)
    u = (solved / denominator).float()
    update_norm = float(u.norm() * delta.float().norm())
    relative_update = update_norm / max(float(weight.float().norm()), 1e-12)
    stats = {"denominator": denominator, "spillover": spillover, "relative_update": relative_update}
    if spillover > max_spillover:
        raise EditRejectedError(
            f"ROME update rejected: k^T C^-1 k = {denominator:.3g} is near zero, so generic inputs would receive "
            f"{spillover:.2f} of the change on average (limit max_spillover={max_spillover}). The subject's key "
            "looks like an ordinary key at this layer; edit another layer or raise max_spillover knowingly"
        )
    if relative_update > max_relative_update:
        raise EditRejectedError(
            f"ROME update rejected: its norm is {relative_update:.2f} times that of W_out (limit "
            f"max_relative_update={max_relative_update}); edit another layer or lower DeltaSettings.max_norm_ratio"
        )
    return u.unsqueeze(1), delta.float().unsqueeze(0), stats


def default_layer(model: HookedTransformer) -> int:
    """An early-middle MLP layer (a fifth of the depth), where causal tracing finds factual recall in GPT models.

    NOTE: ROME's authors picked the layer by causal tracing per model (layer 17 of 48 in GPT-2 XL); this default is
    a rule of thumb. Run excise.locate's causal tracing to choose it for a new model.
    """
    return max(0, min(model.cfg.n_layers - 1, round(model.cfg.n_layers / 5)))
