"""Weight deltas: an edit that adds fixed tensors to named parameters, dense or as low-rank factors.

ROME, MEMIT and the unlearning baselines all end in a change of some weight matrices. Stored as a
:class:`WeightDelta`, that change is inspectable (which parameters, how large relative to the weights), saves and
loads bit-exact, and composes with other edits. Rank-``r`` updates such as ROME's rank-one ``u v^T`` keep their
factors (``left`` of shape ``(rows, r)`` and ``right`` of shape ``(r, cols)``), which is smaller and shows the rank.

A weight delta has no hook form: :attr:`supports_hooks` is False and :meth:`Edit.hooks` raises TypeError.

Warning:
    Parameter names are TransformerLens state-dict names (``blocks.5.mlp.W_out``), whose shapes are
    TransformerLens' ``(d_mlp, d_model)`` layout, the transpose of a Hugging Face ``down_proj.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.edit.base import Edit, ForwardHook, check_signature


class WeightDelta(Edit):
    """Fixed additions to named parameters.

    Attributes:
        dense: Parameter name to a delta of the parameter's shape.
        low_rank: Parameter name to ``(left, right)`` with ``left @ right`` of the parameter's (2-D) shape.
        method: Name of the method that produced the delta, e.g. ``"rome"`` or ``"npo"``.
        info: JSON-serialisable details of how it was made (facts, layers, settings, fit statistics).
    """

    kind = "weight_delta"
    supports_hooks = False

    def __init__(
        self,
        dense: Mapping[str, Tensor] | None = None,
        low_rank: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        *,
        method: str = "weight_delta",
        info: dict[str, Any] | None = None,
        signature: dict[str, Any] | None = None,
    ) -> None:
        self.dense = dict(dense or {})
        self.low_rank = dict(low_rank or {})
        if not self.dense and not self.low_rank:
            raise ValueError("a WeightDelta needs at least one dense or low-rank delta")
        overlap = set(self.dense) & set(self.low_rank)
        if overlap:
            raise ValueError(f"parameters {sorted(overlap)} have both a dense and a low-rank delta; pass one")
        for name, (left, right) in self.low_rank.items():
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"low-rank delta of {name!r} needs left (rows, r) and right (r, cols), got "
                    f"{tuple(left.shape)} and {tuple(right.shape)}"
                )
        self.method = method
        self.info = dict(info or {})
        self.signature = signature

    def delta(self, name: str) -> Tensor:
        """The full delta of one parameter (the product of the factors for a low-rank one)."""
        if name in self.dense:
            return self.dense[name]
        if name in self.low_rank:
            left, right = self.low_rank[name]
            return left @ right
        raise KeyError(f"no delta for parameter {name!r}; this edit changes {sorted(self.parameter_names)}")

    @property
    def parameter_names(self) -> list[str]:
        return [*self.dense, *self.low_rank]

    def forward_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        raise TypeError(f"a {self.method} weight delta exists only in weight form; use edit.apply(model)")

    def check_fits(self, model: HookedTransformer) -> None:
        """Raise ValueError when a parameter is missing from ``model`` or has another shape than its delta."""
        check_signature(self.signature, model)
        parameters = dict(model.named_parameters())
        for name in self.parameter_names:
            if name not in parameters:
                raise ValueError(f"the model has no parameter {name!r} that this {self.method} edit changes")
            shape = tuple(self.dense[name].shape) if name in self.dense else _low_rank_shape(self.low_rank[name])
            if shape != tuple(parameters[name].shape):
                raise ValueError(
                    f"delta for {name!r} has shape {shape} but the parameter has {tuple(parameters[name].shape)}"
                )

    @torch.no_grad()
    def bake(self, model: HookedTransformer) -> None:
        self.check_fits(model)
        for name in self.parameter_names:
            parameter = model.get_parameter(name)
            parameter += self.delta(name).to(device=parameter.device, dtype=parameter.dtype)

    def describe(self) -> pd.DataFrame:
        rows = []
        for name in self.parameter_names:
            delta = self.delta(name).float()
            layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
            rows.append(
                {
                    "parameter": name,
                    "layer": layer,
                    "shape": tuple(delta.shape),
                    "rank": self.low_rank[name][0].shape[1] if name in self.low_rank else None,
                    "delta_norm": float(delta.norm()),
                    "method": self.method,
                }
            )
        return pd.DataFrame(rows)

    def relative_norms(self, model: HookedTransformer) -> dict[str, float]:
        """Frobenius norm of each delta divided by that of the parameter in ``model``."""
        return {
            name: float(self.delta(name).float().norm() / model.get_parameter(name).detach().float().norm().cpu())
            for name in self.parameter_names
        }

    def to_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors = {f"dense/{name}": delta for name, delta in self.dense.items()}
        for name, (left, right) in self.low_rank.items():
            tensors[f"left/{name}"] = left
            tensors[f"right/{name}"] = right
        config = {"method": self.method, "info": self.info, "dense": list(self.dense), "low_rank": list(self.low_rank)}
        return config, tensors

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> WeightDelta:
        dense = {name: tensors[f"dense/{name}"] for name in config["dense"]}
        low_rank = {name: (tensors[f"left/{name}"], tensors[f"right/{name}"]) for name in config["low_rank"]}
        return cls(dense, low_rank, method=config["method"], info=config["info"])

    def __repr__(self) -> str:
        return f"WeightDelta(method={self.method!r}, parameters={self.parameter_names})"


def _low_rank_shape(factors: tuple[Tensor, Tensor]) -> tuple[int, int]:
    return (factors[0].shape[0], factors[1].shape[1])
