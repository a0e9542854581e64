"""SAE feature edits: zero, rescale or clamp sparse-autoencoder features while keeping the SAE's error term.

A sparse autoencoder (Bricken et al., 2023, "Towards Monosemanticity"; Cunningham et al., 2023) writes an
activation ``x`` at its hook as ``x = decode(f(x)) + e(x)``: feature activations ``f`` times decoder rows, plus
``b_dec``, plus an error term ``e`` it fails to reconstruct. Replacing ``x`` by the reconstruction alone would
change the model even with no feature touched, so the edit changes only the chosen features and keeps the error::

    x' = decode(f') + e(x) = x + (f' - f) W_dec[features]

Operations on the chosen features' activations ``f``:

- ``"zero"``: ``f' = 0``;
- ``"scale"``: ``f' = value * f``; a negative ``value`` pushes the model away from the feature;
- ``"clamp"``: conditional clamping: ``f' = value`` only where the feature fires (``f > threshold``), elsewhere
  unchanged (Templeton et al., 2024, "Scaling Monosemanticity", clamp features to a fixed value).

The edit stores only the chosen features' encoder columns, biases and decoder rows, so it saves, loads and runs
without the SAE object. Supported SAEs are sae-lens ``standard`` (ReLU) and ``jumprelu`` SAEs without run-time
activation normalisation, whose features are computed independently of each other. TopK-style SAEs are rejected:
there a feature's activation depends on all the others.

Weight form: the hook edit depends on the input, so :meth:`Edit.apply` raises TypeError. :meth:`SAEFeatureEdit.
weight_form` gives an approximation for residual-stream hooks: it projects the features' decoder directions out of
(or rescales them in) the weights that write to the hook, using :class:`~excise.edit.direction.DirectionRemoval`.
This removes everything along those directions, not only the features' own contribution, and
:func:`weight_form_error` measures how far it is from the hook edit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal, get_args

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.completions import make_text_batch
from excise.edit.base import Edit, ForwardHook, check_signature, model_signature
from excise.edit.direction import DirectionRemoval, given_direction
from excise.edit.sequence import EditSequence

SAEOperation = Literal["zero", "scale", "clamp"]
SAE_OPERATIONS: tuple[SAEOperation, ...] = get_args(SAEOperation)
SUPPORTED_ARCHITECTURES = ("standard", "jumprelu")
_RESIDUAL_HOOK = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out)$"
)


@dataclasses.dataclass(frozen=True)
class FeatureSlice:
    """The parts of an SAE that compute and write a few of its features.

    Attributes:
        encoder: ``W_enc[:, features]``.
        encoder_bias: ``b_enc[features]``.
        decoder: ``W_dec[features]``.
        decoder_bias: ``b_dec``, subtracted from the input before encoding when ``subtract_decoder_bias``.
        thresholds: JumpReLU thresholds of the features, or None for a ReLU SAE.
        subtract_decoder_bias: sae-lens' ``apply_b_dec_to_input``.
    """

    encoder: Float[Tensor, "d_in feature"]
    encoder_bias: Float[Tensor, " feature"]
    decoder: Float[Tensor, "feature d_in"]
    decoder_bias: Float[Tensor, " d_in"]
    thresholds: Float[Tensor, " feature"] | None
    subtract_decoder_bias: bool

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... feature"]:
        """The features' activations, as the SAE's own ``encode`` computes them."""
        if self.subtract_decoder_bias:
            x = x - self.decoder_bias.to(x)
        pre = x @ self.encoder.to(x) + self.encoder_bias.to(x)
        acts = torch.relu(pre)
        if self.thresholds is not None:
            acts = acts * (pre > self.thresholds.to(x)).to(acts.dtype)
        return acts


class SAEFeatureEdit(Edit):
    """Zero, scale or clamp a few SAE features at the SAE's hook, keeping the SAE's error term.

    Build one with :func:`sae_feature_edit`.

    Attributes:
        hook: The SAE's hook name.
        sae_id: Name of the SAE, for reports.
        features: Indices of the edited features in the SAE.
        operation: ``"zero"``, ``"scale"`` or ``"clamp"``.
        value: Scale factor (``"scale"``) or clamp value (``"clamp"``); unused for ``"zero"``.
        threshold: ``"clamp"`` acts where a feature's activation exceeds this.
        parts: The features' encoder and decoder slices.
    """

    kind = "sae_features"
    supports_weights = False

    def __init__(
        self,
        hook: str,
        sae_id: str,
        features: Sequence[int],
        operation: SAEOperation,
        parts: FeatureSlice,
        *,
        value: float = 0.0,
        threshold: float = 0.0,
        signature: dict[str, Any] | None = None,
    ) -> None:
        if operation not in SAE_OPERATIONS:
            raise ValueError(f"operation must be one of {SAE_OPERATIONS}, got {operation!r}")
        if not features:
            raise ValueError("an SAEFeatureEdit needs at least one feature")
        if parts.encoder.shape[1] != len(features) or parts.decoder.shape[0] != len(features):
            raise ValueError(
                f"parts contain {parts.encoder.shape[1]} encoder columns and {parts.decoder.shape[0]} decoder rows for "
                f"{len(features)} features"
            )
        self.hook = hook
        self.sae_id = sae_id
        self.features = tuple(int(f) for f in features)
        self.operation = operation
        self.value = float(value)
        self.threshold = float(threshold)
        self.parts = parts
        self.signature = signature

    def edit_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """Apply the edit to SAE inputs ``x`` (last axis ``d_in``)."""
        acts = self.parts.encode(x)
        if self.operation == "zero":
            new = torch.zeros_like(acts)
        elif self.operation == "scale":
            new = acts * self.value
        else:
            new = torch.where(acts > self.threshold, torch.full_like(acts, self.value), acts)
        return x + (new - acts) @ self.parts.decoder.to(x)

    def forward_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        def edit(activation: Tensor, hook: HookPoint) -> Tensor:
            if activation.ndim == 4:  # hook_z: (batch, pos, head_index, d_head) is flattened as sae-lens does
                flat = einops.rearrange(activation, "batch pos head_index d_head -> batch pos (head_index d_head)")
                edited = self.edit_activations(flat)
                return einops.rearrange(
                    edited, "batch pos (head_index d_head) -> batch pos head_index d_head", d_head=activation.shape[-1]
                )
            return self.edit_activations(activation)

        return [(self.hook, edit)]

    def no_weight_form_reason(self) -> str:
        return (
            "SAE feature edits depend on the input, so they have no exact weight form; run them with "
            "edit.hooks(model), or use edit.weight_form(model) for an approximation and weight_form_error to "
            "measure it"
        )

    def bake(self, model: HookedTransformer) -> None:
        raise TypeError(self.no_weight_form_reason())

    def weight_form(self, model: HookedTransformer) -> Edit:
        """An approximate weight edit: rescale the features' decoder directions in the writes to the hook.

        The directions are orthonormalised (QR), then each is removed (``"zero"``) or scaled by ``value``
        (``"scale"``) in every write that reaches the hook. Raises TypeError for ``"clamp"`` (no linear form)
        and for hooks that are not residual-stream sums or layer outputs.
        """
        check_signature(self.signature, model)
        if self.operation == "clamp":
            raise TypeError("conditional clamping acts only where a feature fires, which no weight change can do")
        match = _RESIDUAL_HOOK.match(self.hook)
        if match is None:
            raise TypeError(
                f"weight_form supports SAEs on residual-stream hooks (hook_resid_pre/mid/post, hook_attn_out, "
                f"hook_mlp_out), not {self.hook!r}"
            )
        writers = _writers_into(model, int(match.group(1)), match.group(2))
        basis, _ = torch.linalg.qr(self.parts.decoder.double().T)  # (d_model, n) orthonormal columns
        scale = 0.0 if self.operation == "zero" else self.value
        edits = [
            DirectionRemoval(
                given_direction(basis[:, i].float(), hook=self.hook), writers, scale, signature=self.signature
            )
            for i in range(basis.shape[1])
        ]
        return edits[0] if len(edits) == 1 else EditSequence(tuple(edits))

    def describe(self) -> pd.DataFrame:
        rows = [
            {
                "hook": self.hook,
                "layer": int(self.hook.split(".")[1]) if self.hook.startswith("blocks.") else None,
                "sae_id": self.sae_id,
                "feature": feature,
                "operation": self.operation,
                "value": None if self.operation == "zero" else self.value,
                "threshold": self.threshold if self.operation == "clamp" else None,
            }
            for feature in self.features
        ]
        return pd.DataFrame(rows)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config = {
            "hook": self.hook,
            "sae_id": self.sae_id,
            "features": list(self.features),
            "operation": self.operation,
            "value": self.value,
            "threshold": self.threshold,
            "subtract_decoder_bias": self.parts.subtract_decoder_bias,
        }
        tensors = {
            "encoder": self.parts.encoder,
            "encoder_bias": self.parts.encoder_bias,
            "decoder": self.parts.decoder,
            "decoder_bias": self.parts.decoder_bias,
        }
        if self.parts.thresholds is not None:
            tensors["thresholds"] = self.parts.thresholds
        return config, tensors

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> SAEFeatureEdit:
        parts = FeatureSlice(
            tensors["encoder"],
            tensors["encoder_bias"],
            tensors["decoder"],
            tensors["decoder_bias"],
            tensors.get("thresholds"),
            config["subtract_decoder_bias"],
        )
        return cls(
            config["hook"],
            config["sae_id"],
            config["features"],
            config["operation"],
            parts,
            value=config["value"],
            threshold=config["threshold"],
        )

    def __repr__(self) -> str:
        return f"SAEFeatureEdit(hook={self.hook!r}, features={len(self.features)}, operation={self.operation!r})"


def sae_feature_edit(
    model: HookedTransformer,
    sae: Any,
    features: Sequence[int],
    operation: SAEOperation = "zero",
    *,
    value: float | None = None,
    threshold: float = 0.0,
    sae_id: str | None = None,
) -> SAEFeatureEdit:
    """Build an :class:`SAEFeatureEdit` of ``features`` of a sae-lens SAE attached at its own hook.

    Args:
        model: The model the SAE reads; its hook must exist and have the SAE's input width.
        sae: A sae-lens ``SAE`` (``standard`` or ``jumprelu`` architecture, ``normalize_activations="none"``).
        features: Feature indices; duplicates are removed.
        operation: ``"zero"``, ``"scale"`` or ``"clamp"``.
        value: Required for ``"scale"`` (e.g. ``-1.0``) and ``"clamp"`` (e.g. ``-5.0``).
        threshold: For ``"clamp"``: clamp where the feature's activation exceeds this.
        sae_id: Name for reports; default the SAE's hook name and width.
    """
    if operation not in SAE_OPERATIONS:
        raise ValueError(f"operation must be one of {SAE_OPERATIONS}, got {operation!r}")
    if operation != "zero" and value is None:
        raise ValueError(f"operation {operation!r} needs a value (scale factor or clamp value), e.g. value=-1.0")
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(cfg, "architecture"):
        raise TypeError(f"sae must be a sae-lens SAE, got {type(sae).__name__}")
    architecture = cfg.architecture()
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise TypeError(
            f"SAE architecture {architecture!r} is not supported: a feature's activation must not depend on the "
            f"others; supported architectures are {SUPPORTED_ARCHITECTURES}"
        )
    if cfg.normalize_activations != "none":
        raise TypeError(
            f"SAEs with normalize_activations={cfg.normalize_activations!r} are not supported; fold the "
            "normalisation into the weights first (sae-lens: fold_activation_norm_scaling_factor)"
        )
    hook = cfg.metadata.hook_name
    if hook not in model.hook_dict:
        raise ValueError(f"the SAE's hook {hook!r} is not in the model; is this SAE for another model?")
    unique = list(dict.fromkeys(int(f) for f in features))
    if not unique:
        raise ValueError("pass at least one feature index")
    bad = [f for f in unique if not 0 <= f < cfg.d_sae]
    if bad:
        raise ValueError(f"feature indices {bad} are out of range; the SAE has d_sae={cfg.d_sae} features")
    _check_width(model, hook, cfg.d_in)

    index = torch.tensor(unique)
    with torch.no_grad():
        parts = FeatureSlice(
            encoder=sae.W_enc[:, index].detach().float().cpu().clone(),
            encoder_bias=sae.b_enc[index].detach().float().cpu().clone(),
            decoder=sae.W_dec[index].detach().float().cpu().clone(),
            decoder_bias=sae.b_dec.detach().float().cpu().clone(),
            thresholds=sae.threshold[index].detach().float().cpu().clone() if architecture == "jumprelu" else None,
            subtract_decoder_bias=bool(cfg.apply_b_dec_to_input),
        )
    name = sae_id or f"{hook}/{cfg.d_sae}"
    return SAEFeatureEdit(
        hook,
        name,
        unique,
        operation,
        parts,
        value=value or 0.0,
        threshold=threshold,
        signature=model_signature(model),
    )


@dataclasses.dataclass(frozen=True)
class WeightFormError:
    """How far the weight form of an SAE edit is from its hook form, on some texts.

    Attributes:
        change_relative_error: ``|(h_w - h) - (h_e - h)| / |h_e - h|`` summed over tokens, at the SAE's hook:
            how much of the intended change the weight form misses or adds (0 is exact).
        activation_relative_error: ``|h_w - h_e| / |h_e|`` over tokens at the hook.
        logit_kl: Mean KL(hook form || weight form) of the next-token distributions, in nats.
        top1_agreement: Fraction of tokens where both forms predict the same next token.
    """

    change_relative_error: float
    activation_relative_error: float
    logit_kl: float
    top1_agreement: float


@torch.no_grad()
def weight_form_error(model: HookedTransformer, edit: SAEFeatureEdit, texts: Sequence[str]) -> WeightFormError:
    """Compare ``edit`` as hooks with ``edit.weight_form(model)`` baked, on every real token of ``texts``."""
    tokens, lengths = make_text_batch(model, texts)
    mask = torch.arange(tokens.shape[1], device=lengths.device) < lengths.unsqueeze(1)
    _, clean = model.run_with_cache(tokens, names_filter=edit.hook)
    with edit.hooks(model):
        # Hooks added inside run_with_cache run before the cache hook, so the cache sees the edited value.
        hook_logits, hooked = model.run_with_cache(tokens, names_filter=edit.hook)
    baked = edit.weight_form(model).apply(model)
    weight_logits, weighted = baked.run_with_cache(tokens, names_filter=edit.hook)
    h, h_e, h_w = (cache[edit.hook][mask].flatten(1).float() for cache in (clean, hooked, weighted))
    intended = h_e - h
    change_error = float((h_w - h_e).norm() / intended.norm().clamp_min(1e-12))
    activation_error = float((h_w - h_e).norm() / h_e.norm().clamp_min(1e-12))
    p_log = hook_logits[mask].float().log_softmax(-1)
    q_log = weight_logits[mask].float().log_softmax(-1)
    kl = float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    agreement = float((p_log.argmax(-1) == q_log.argmax(-1)).float().mean())
    return WeightFormError(change_error, activation_error, kl, agreement)


def _writers_into(model: HookedTransformer, layer: int, point: str) -> list[str]:
    """Residual-stream writes whose sum is the value at ``blocks.layer.<point>``."""
    if point == "hook_mlp_out":
        return [f"blocks.{layer}.hook_mlp_out"]
    if point == "hook_attn_out":
        return [f"blocks.{layer}.hook_attn_out"]
    writers = ["hook_embed"]
    if model.cfg.positional_embedding_type == "standard":
        writers.append("hook_pos_embed")
    last_full = {"hook_resid_pre": layer - 1, "hook_resid_mid": layer - 1, "hook_resid_post": layer}[point]
    for previous in range(last_full + 1):
        writers.append(f"blocks.{previous}.hook_attn_out")
        if not model.cfg.attn_only:
            writers.append(f"blocks.{previous}.hook_mlp_out")
    if point == "hook_resid_mid":
        writers.append(f"blocks.{layer}.hook_attn_out")
    if model.cfg.parallel_attn_mlp and point == "hook_resid_mid":
        raise TypeError("hook_resid_mid does not exist as a sum of writes in models with parallel attention and MLP")
    return writers


def _check_width(model: HookedTransformer, hook: str, d_in: int) -> None:
    cfg = model.cfg
    if hook.endswith("attn.hook_z"):
        width = cfg.n_heads * cfg.d_head
    elif hook.endswith(("mlp.hook_post", "mlp.hook_pre")):
        width = cfg.d_mlp
    elif hook.endswith(("hook_q", "hook_k", "hook_v")):
        return  # per-head widths differ under grouped-query attention; the hook checks at run time
    else:
        width = cfg.d_model
    if width != d_in:
        raise ValueError(f"the SAE reads {d_in} values but hook {hook!r} has width {width} in this model")
