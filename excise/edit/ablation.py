"""Ablation of MLP neurons and attention heads: replace their output with zero or a fixed mean value.

In hook form, the activation at ``blocks.L.mlp.hook_post[..., i]`` or ``blocks.L.attn.hook_z[..., h, :]`` is
overwritten. In weight form the same change is exact and input-independent: a neuron's row of ``W_out`` (a head's
block of ``W_O``) is set to zero, and the constant value it would have written is added to the output bias
``b_out`` (``b_O``). Both forms give the same logits; the hook form also changes what later hooks see at that
hook point, the weight form does not.

Mean ablation takes the mean activation over reference prompts (every token position), which keeps the
layer's average output and so disturbs the model less than zero ablation (Wang et al., 2022, "Interpretability in
the Wild").

Resample ablation (Chan et al., 2022, "Causal Scrubbing") replaces a component's activation with its activation
on another input. Here every token of the edited input takes the activations of one token drawn at random from the
reference texts; all ablated sites of one token use the same reference token, so they keep their joint
distribution. Draws come from a generator seeded with the edit's ``seed`` at every forward pass, so the same
input always gets the same replacement. Resample ablation depends on the input and has no weight form:
:meth:`Edit.apply` raises TypeError. Mean ablation is its input-independent counterpart.

Warning:
    Heads are query heads addressed through ``hook_z``. In grouped-query models several query heads share a
    key/value head; ablating one query head leaves its group's other heads untouched.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
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
from excise.sites import Site

AblationValue = Literal["zero", "mean", "resample"]
ABLATION_VALUES: tuple[AblationValue, ...] = get_args(AblationValue)


class Ablation(Edit):
    """Zero, mean or resample ablation of neuron and head sites.

    Build one with :func:`ablate`, which checks the sites against the model and computes the replacement values.

    Attributes:
        sites: Neuron (``hook_post``) and head (``hook_z``) sites.
        value: ``"zero"``, ``"mean"`` or ``"resample"``.
        replacements: Per hook, the value written in place of each ablated component, in the order of that
            hook's sites: shape ``(n_sites,)`` for neurons and ``(n_sites, d_head)`` for heads. For resample
            ablation, a bank of reference token activations instead: ``(n_tokens, n_sites)`` or
            ``(n_tokens, n_sites, d_head)``, with the same tokens in every hook.
        seed: Seed of the draws of resample ablation.
    """

    kind = "ablation"

    def __init__(
        self,
        sites: Sequence[Site],
        value: AblationValue,
        replacements: dict[str, Tensor],
        signature: dict[str, Any] | None = None,
        *,
        seed: int = 0,
    ) -> None:
        if value not in ABLATION_VALUES:
            raise ValueError(f"value must be one of {ABLATION_VALUES}, got {value!r}")
        if not sites:
            raise ValueError("an Ablation needs at least one site")
        for site in sites:
            if site.kind not in ("neuron", "head"):
                raise ValueError(f"Ablation takes neuron and head sites, got a {site.kind} site {site}")
        self.sites = tuple(sites)
        self.value = value
        self.replacements = replacements
        self.signature = signature
        self.seed = seed
        self._by_hook: dict[str, list[int]] = defaultdict(list)
        for site in self.sites:
            self._by_hook[site.hook].append(site.index)
        site_axis = 1 if value == "resample" else 0
        for hook, indices in self._by_hook.items():
            if hook not in replacements or replacements[hook].ndim <= site_axis:
                raise ValueError(f"replacements is missing values for hook {hook!r}")
            if replacements[hook].shape[site_axis] != len(indices):
                raise ValueError(
                    f"replacements for {hook!r} must have {len(indices)} entries (one per site) along dim "
                    f"{site_axis}, got shape {tuple(replacements[hook].shape)}"
                )
        if value == "resample":
            bank_sizes = {replacements[hook].shape[0] for hook in self._by_hook}
            if len(bank_sizes) != 1 or 0 in bank_sizes:
                raise ValueError(
                    f"resample banks must hold the same non-zero number of reference tokens in every hook, "
                    f"got {sorted(bank_sizes)}"
                )

    @property
    def supports_weights(self) -> bool:  # type: ignore[override]
        # Zero and mean values are constants that fold into the output bias; resampled values change per input.
        return self.value != "resample"

    def forward_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        if self.value == "resample":
            return self._resample_hooks(model)
        hooks: list[ForwardHook] = []
        for hook_name, indices in self._by_hook.items():
            index = torch.tensor(indices, device=model.cfg.device)
            values = self.replacements[hook_name].to(model.cfg.device)

            def overwrite(
                activation: Tensor, hook: HookPoint, index: Tensor = index, values: Tensor = values
            ) -> Tensor:
                activation = activation.clone()
                # hook_post is (batch, pos, d_mlp) and hook_z is (batch, pos, head_index, d_head); the component
                # axis is dim 2 in both.
                activation[:, :, index] = values.to(activation.dtype)
                return activation

            hooks.append((hook_name, overwrite))
        return hooks

    def _resample_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        hooks: list[ForwardHook] = []
        for hook_name, indices in self._by_hook.items():
            index = torch.tensor(indices, device=model.cfg.device)
            bank = self.replacements[hook_name]

            def resample(
                activation: Tensor, hook: HookPoint, index: Tensor = index, bank: Tensor = bank, seed: int = self.seed
            ) -> Tensor:
                # Every hook draws with the same seed and shape, so all hooks pick the same reference tokens.
                generator = torch.Generator().manual_seed(seed)
                draws = torch.randint(bank.shape[0], activation.shape[:2], generator=generator)
                activation = activation.clone()
                activation[:, :, index] = bank[draws].to(device=activation.device, dtype=activation.dtype)
                return activation

            hooks.append((hook_name, resample))
        return hooks

    def no_weight_form_reason(self) -> str:
        return (
            "resample ablation replaces activations with those of other inputs, which no fixed weights can "
            "reproduce; run it with edit.hooks(model), or use mean ablation for a weight form"
        )

    @torch.no_grad()
    def bake(self, model: HookedTransformer) -> None:
        if self.value == "resample":
            raise TypeError(self.no_weight_form_reason())
        for hook_name, indices in self._by_hook.items():
            site = Site(hook_name, indices[0], "head" if hook_name.endswith("attn.hook_z") else "neuron")
            layer = site.layer
            assert layer is not None  # hook names of neuron and head sites always start with blocks.L
            index = torch.tensor(indices, device=model.cfg.device)
            values = self.replacements[hook_name].to(model.cfg.device)
            if site.kind == "neuron":
                weight = model.get_parameter(f"blocks.{layer}.mlp.W_out")  # (d_mlp, d_model)
                bias = model.get_parameter(f"blocks.{layer}.mlp.b_out")  # (d_model,)
                bias += (values.unsqueeze(1).to(weight.dtype) * weight[index]).sum(0)
                weight[index] = 0.0
            else:
                weight = model.get_parameter(f"blocks.{layer}.attn.W_O")  # (head_index, d_head, d_model)
                bias = model.get_parameter(f"blocks.{layer}.attn.b_O")  # (d_model,)
                bias += torch.einsum("nh,nhd->d", values.to(weight.dtype), weight[index])
                weight[index] = 0.0

    def describe(self) -> pd.DataFrame:
        rows = []
        for site in self.sites:
            rows.append(
                {"hook": site.hook, "layer": site.layer, "kind": site.kind, "index": site.index, "value": self.value}
            )
        return pd.DataFrame(rows)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config = {"value": self.value, "seed": self.seed, "sites": [dataclasses.asdict(site) for site in self.sites]}
        return config, {f"replacement/{hook}": values for hook, values in self.replacements.items()}

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> Ablation:
        sites = [Site(**entry) for entry in config["sites"]]
        replacements = {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith("replacement/")}
        return cls(sites, config["value"], replacements, seed=config.get("seed", 0))

    def __repr__(self) -> str:
        return f"Ablation(value={self.value!r}, sites={len(self.sites)}, hooks={len(self._by_hook)})"


def ablate(
    model: HookedTransformer,
    sites: Sequence[Site],
    value: AblationValue = "zero",
    *,
    reference: Sequence[str] = (),
    batch_size: int = 16,
    seed: int = 0,
    max_reference_tokens: int = 4096,
) -> Ablation:
    """Build an :class:`Ablation` of ``sites`` for ``model``.

    Args:
        model: The model the edit is made for; its shape is recorded in the edit.
        sites: Neuron and head sites; duplicates are removed.
        value: ``"zero"``; ``"mean"`` for the mean activation over ``reference``; ``"resample"`` for the
            activations of tokens drawn from ``reference`` (hook form only).
        reference: Texts whose activations (all token positions) give the mean values or the resample bank;
            required for ``"mean"`` and ``"resample"``.
        batch_size: Texts per forward pass when reading reference activations.
        seed: Seed of the resample draws; also picks which tokens enter the bank when ``reference`` has more
            than ``max_reference_tokens`` tokens.
        max_reference_tokens: Size limit of the resample bank, in tokens.
    """
    if value not in ABLATION_VALUES:
        raise ValueError(f"value must be one of {ABLATION_VALUES}, got {value!r}")
    unique = list(dict.fromkeys(sites))
    if not unique:
        raise ValueError("no sites to ablate; pass at least one Site")
    for site in unique:
        site.check(model)
    by_hook: dict[str, list[int]] = defaultdict(list)
    for site in unique:
        by_hook[site.hook].append(site.index)

    if value == "zero":
        replacements = {hook: _zeros(model, hook, len(indices)) for hook, indices in by_hook.items()}
    elif not reference:
        raise ValueError(f"{value} ablation needs reference texts; pass reference=[...] (e.g. retain prompts)")
    elif value == "mean":
        means = mean_activations(model, list(by_hook), reference, batch_size=batch_size)
        replacements = {hook: means[hook][torch.tensor(indices)] for hook, indices in by_hook.items()}
    else:
        if max_reference_tokens < 1:
            raise ValueError(f"max_reference_tokens must be >= 1, got {max_reference_tokens}")
        banks = token_activations(model, by_hook, reference, batch_size=batch_size)
        n_tokens = next(iter(banks.values())).shape[0]
        if n_tokens > max_reference_tokens:
            keep = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))[:max_reference_tokens]
            banks = {hook: bank[keep.sort().values] for hook, bank in banks.items()}
        replacements = banks
    return Ablation(unique, value, replacements, signature=model_signature(model), seed=seed)


@torch.no_grad()
def mean_activations(
    model: HookedTransformer, hooks: Sequence[str], texts: Sequence[str], batch_size: int = 16
) -> dict[str, Float[Tensor, "component ..."]]:
    """Mean activation of each hook over every real (non-padding) token of ``texts``, on the CPU."""
    if not texts:
        raise ValueError("mean_activations needs at least one text")
    sums: dict[str, Tensor] = {}
    count = 0
    for start in tqdm(range(0, len(texts), batch_size), desc="mean activations", leave=False):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size])
        mask = torch.arange(tokens.shape[1], device=lengths.device) < lengths.unsqueeze(1)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        for hook in hooks:
            activation = cache[hook][mask].float().cpu()  # (tokens, component, ...)
            sums[hook] = sums.get(hook, 0) + activation.sum(0)
        count += int(mask.sum())
    return {hook: total / count for hook, total in sums.items()}


@torch.no_grad()
def token_activations(
    model: HookedTransformer, components: dict[str, list[int]], texts: Sequence[str], batch_size: int = 16
) -> dict[str, Float[Tensor, "token component ..."]]:
    """Activations of the given components of each hook at every real token of ``texts``, on the CPU.

    Row ``t`` of every hook's tensor comes from the same token, in text order.
    """
    if not texts:
        raise ValueError("token_activations needs at least one text")
    rows: dict[str, list[Tensor]] = defaultdict(list)
    for start in tqdm(range(0, len(texts), batch_size), desc="reference activations", leave=False):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size])
        mask = torch.arange(tokens.shape[1], device=lengths.device) < lengths.unsqueeze(1)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in components)
        for hook, indices in components.items():
            rows[hook].append(cache[hook][mask][:, indices].float().cpu())
    return {hook: torch.cat(parts) for hook, parts in rows.items()}


def _zeros(model: HookedTransformer, hook: str, n: int) -> Tensor:
    if hook.endswith("attn.hook_z"):
        return torch.zeros(n, model.cfg.d_head)
    return torch.zeros(n)
