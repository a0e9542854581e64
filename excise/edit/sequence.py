"""A chain of edits applied in order."""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.edit.base import _REGISTRY, Edit, ForwardHook


class EditSequence(Edit):
    """Edits applied one after another; saved as one folder."""

    kind = "sequence"

    def __init__(self, edits: tuple[Edit, ...]) -> None:
        if not edits:
            raise ValueError("an EditSequence needs at least one edit")
        flat: list[Edit] = []
        for edit in edits:
            flat.extend(edit.edits if isinstance(edit, EditSequence) else (edit,))
        self.edits = tuple(flat)
        self.signature = next((e.signature for e in self.edits if e.signature is not None), None)

    @property
    def supports_hooks(self) -> bool:  # type: ignore[override]
        return all(edit.supports_hooks for edit in self.edits)

    @property
    def supports_weights(self) -> bool:  # type: ignore[override]
        return all(edit.supports_weights for edit in self.edits)

    def no_weight_form_reason(self) -> str:
        blocking = next(edit for edit in self.edits if not edit.supports_weights)
        return (
            f"step {self.edits.index(blocking)} of this sequence has no weight form: {blocking.no_weight_form_reason()}"
        )

    def forward_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        # TransformerLens runs hooks on one hook point in the order they were added, so later edits see the
        # output of earlier ones, as they would in baked form.
        return [hook for edit in self.edits for hook in edit.forward_hooks(model)]

    def bake(self, model: HookedTransformer) -> None:
        for edit in self.edits:
            edit.bake(model)

    def describe(self) -> pd.DataFrame:
        frames = [edit.describe().assign(step=step, edit=edit.kind) for step, edit in enumerate(self.edits)]
        return pd.concat(frames, ignore_index=True)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        steps = []
        tensors: dict[str, Tensor] = {}
        for step, edit in enumerate(self.edits):
            config, parts = edit.to_parts()
            steps.append({"kind": edit.kind, "config": config, "signature": edit.signature})
            tensors.update({f"{step}/{name}": tensor for name, tensor in parts.items()})
        return {"steps": steps}, tensors

    @classmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> EditSequence:
        edits = []
        for step, entry in enumerate(config["steps"]):
            prefix = f"{step}/"
            parts = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            edit = _REGISTRY[entry["kind"]].from_parts(entry["config"], parts)
            edit.signature = entry.get("signature")
            edits.append(edit)
        return cls(tuple(edits))
