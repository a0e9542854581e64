"""Read and overwrite the components behind sites inside a forward pass: the shared plumbing of locate methods.

Every kind of site lives on one hook, along one axis of that hook's activation:

============  ===============================  ==============================  ==============
kind          hook                             activation                      component axis
============  ===============================  ==============================  ==============
neuron        ``blocks.L.mlp.hook_post``       ``batch pos d_mlp``             2
head          ``blocks.L.attn.hook_z``         ``batch pos head_index d_head``  2
residual      ``blocks.L.hook_resid_pre`` ...  ``batch pos d_model``           1 (position)
sae_feature   the SAE's hook                   ``batch pos d_sae``             2
============  ===============================  ==============================  ==============

SAE features are not a hook of the model. They appear when an SAE is spliced in at its hook: the activation ``x``
is replaced by ``decode(f') + (x - decode(f))`` where ``f = encode(x)`` and ``f'`` is ``f`` after an edit. Without
an edit the output equals ``x`` (the reconstruction error is kept), so attaching an SAE does not change the model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.locate.metric import FactBatch, Metric, run_metric
from excise.sites import SiteKind, head_hooks, neuron_hooks

#: Called with a component activation and the hook name; returns a replacement or None to keep it.
ComponentFn = Callable[[Tensor, str], Tensor | None]
#: TransformerLens ``fwd_hooks``: ``(hook name, function)`` pairs.
ForwardHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]

_LAYER = re.compile(r"^blocks\.(\d+)\.")


class FeatureSplice(Protocol):
    """The interface locate methods need from an SAE: its hook, name and size, and a splicing hook."""

    @property
    def hook_name(self) -> str: ...

    @property
    def sae_id(self) -> str: ...

    @property
    def d_sae(self) -> int: ...

    def splice_hook(self, edit: ComponentFn | None = None) -> Callable[[Tensor, HookPoint], Tensor]:
        """A TransformerLens hook that splices the SAE in, applying ``edit`` to the feature activations."""
        ...


def component_axis(kind: SiteKind) -> int:
    """Axis of a hook's activation along which ``kind`` sites are indexed."""
    return 1 if kind == "residual" else 2


def layer_of(hook: str) -> int | None:
    """Block index of a hook name, or None for hooks outside the blocks (``hook_embed``)."""
    match = _LAYER.match(hook)
    return int(match.group(1)) if match else None


def default_hooks(model: HookedTransformer, kind: SiteKind, sae: FeatureSplice | None = None) -> list[str]:
    """The hooks a method scores for ``kind`` when the caller names none.

    Neurons: every ``mlp.hook_post``; heads: every ``attn.hook_z``; residual: every ``hook_resid_pre`` plus the
    last block's ``hook_resid_post``; SAE features: the SAE's hook.
    """
    if kind == "neuron":
        return neuron_hooks(model)
    if kind == "head":
        return head_hooks(model)
    if kind == "residual":
        last = model.cfg.n_layers - 1
        return [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)] + [
            f"blocks.{last}.hook_resid_post"
        ]
    return [require_sae(sae, kind).hook_name]


def require_sae(sae: FeatureSplice | None, kind: SiteKind) -> FeatureSplice:
    if sae is None:
        raise ValueError(f"kind {kind!r} needs an SAE; pass sae=... (see excise.locate.sae)")
    return sae


def check_hooks(model: HookedTransformer, kind: SiteKind, hooks: Sequence[str], sae: FeatureSplice | None) -> None:
    """Raise ValueError when a hook does not exist or does not carry ``kind`` sites."""
    if not hooks:
        raise ValueError(f"no hooks to score for kind {kind!r}; pass at least one hook name")
    for hook in hooks:
        if hook not in model.hook_dict:
            raise ValueError(f"hook {hook!r} not found in the model; see model.hook_dict for valid names")
        suffix = {"neuron": "mlp.hook_post", "head": "attn.hook_z"}.get(kind)
        if suffix is not None and not hook.endswith(suffix):
            raise ValueError(f"{kind} sites live on hooks ending in {suffix!r}, got {hook!r}")
        if kind == "residual" and "hook_resid" not in hook:
            raise ValueError(f"residual sites live on hook_resid_* hooks, got {hook!r}")
        if kind == "sae_feature" and hook != require_sae(sae, kind).hook_name:
            raise ValueError(f"the SAE reads hook {require_sae(sae, kind).hook_name!r}, not {hook!r}")


def component_hooks(
    kind: SiteKind, hooks: Sequence[str], fn: ComponentFn, sae: FeatureSplice | None = None
) -> ForwardHooks:
    """TransformerLens forward hooks that pass each hook's component activation through ``fn``.

    For ``sae_feature`` the single hook splices the SAE in, and ``fn`` receives (and may replace) the features.
    """
    if kind == "sae_feature":
        splice = require_sae(sae, kind)
        return [(splice.hook_name, splice.splice_hook(fn))]

    def call(activation: Tensor, hook: HookPoint) -> Tensor | None:
        return fn(activation, hook.name)  # type: ignore[arg-type]

    return [(name, call) for name in hooks]


def capture_hooks(
    kind: SiteKind, hooks: Sequence[str], store: dict[str, Tensor], sae: FeatureSplice | None = None
) -> ForwardHooks:
    """Forward hooks that keep each hook's component activation in ``store`` (graph kept; detach if needed)."""

    def keep(activation: Tensor, name: str) -> None:
        store[name] = activation

    return component_hooks(kind, hooks, keep, sae)


def pad_to_common_width(set_scores: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Zero-pad per-position scores to one length: fact sets of different lengths give vectors of different lengths.

    A position past a fact's last token has no effect on it, so zero is its exact score.
    """
    width = max(values.numel() for per_hook in set_scores.values() for values in per_hook.values())
    return {
        which: {hook: torch.nn.functional.pad(v, (0, width - v.numel())) for hook, v in per_hook.items()}
        for which, per_hook in set_scores.items()
    }


def add_padded(total: Tensor | None, scores: Tensor) -> Tensor:
    """``total + scores`` for 1-D score vectors, zero-padding the shorter (per-position scores of batches differ)."""
    if total is None:
        return scores
    width = max(total.numel(), scores.numel())
    pad = torch.nn.functional.pad
    return pad(total, (0, width - total.numel())) + pad(scores, (0, width - scores.numel()))


@dataclasses.dataclass(frozen=True)
class CleanRun:
    """One clean forward pass over a batch: the metric, site activations and residual streams to restart from.

    Attributes:
        baseline: The metric per row.
        activations: Per hook, the (detached) component activation.
        residuals: Per block index, the clean ``hook_resid_pre``; patched passes start there, since nothing before
            a site's block changes when the site is ablated.
        keys: Per block index from the first hooked block on, the clean attention keys (``batch pos kv_head
            d_head``, before rotary embedding, as TransformerLens caches them); only with ``keys_values=True``.
        values: Likewise the clean attention values.
    """

    baseline: Tensor
    activations: dict[str, Tensor]
    residuals: dict[int, Tensor]
    keys: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    values: dict[int, Tensor] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def run_clean(
    model: HookedTransformer,
    batch: FactBatch,
    kind: SiteKind,
    hooks: Sequence[str],
    metric: Metric,
    sae: FeatureSplice | None = None,
    *,
    keys_values: bool = False,
) -> CleanRun:
    """Run ``batch`` once, keeping what patched passes over the same batch need.

    With ``keys_values=True`` the attention keys and values of every block from the first hooked one on are kept
    too, so a patched pass can recompute only the positions a patch reaches and read the rest from them.
    """
    activations: dict[str, Tensor] = {}
    residuals: dict[int, Tensor] = {}
    keys: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}

    def keep_residual(activation: Tensor, hook: HookPoint) -> None:
        layer = layer_of(hook.name or "")
        if layer is not None:
            residuals[layer] = activation.clone()

    layers = sorted({layer for layer in map(layer_of, hooks) if layer is not None})
    residual_hooks: ForwardHooks = [(f"blocks.{layer}.hook_resid_pre", keep_residual) for layer in layers]
    if keys_values and layers:

        def keep_into(store: dict[int, Tensor]):
            def keep(activation: Tensor, hook: HookPoint) -> None:
                store[int((hook.name or "").split(".")[1])] = activation.clone()

            return keep

        for layer in range(layers[0], model.cfg.n_layers):
            residual_hooks.append((f"blocks.{layer}.attn.hook_k", keep_into(keys)))
            residual_hooks.append((f"blocks.{layer}.attn.hook_v", keep_into(values)))
    # The residual hooks come first, so they see the block input before an SAE spliced in at the same hook.
    with model.hooks(fwd_hooks=[*residual_hooks, *capture_hooks(kind, hooks, activations, sae)]):
        baseline = run_metric(model, batch, metric)
    activations = {name: a.detach().clone() for name, a in activations.items()}
    return CleanRun(baseline, activations, residuals, keys, values)
