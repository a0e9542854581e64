"""The Edit: a description of a change to a model that can run as hooks, be baked into weights, saved and composed.

An edit is data, not a modified model. The same edit can be

- run as removable forward hooks (:meth:`Edit.hooks`, a context manager that removes them also after an
  exception): an *inference-time* edit that leaves the weights untouched;
- baked into the weights of a copy of the model (:meth:`Edit.apply`): the form a user would ship, and the one
  that deep-forgetting checks judge;
- saved as ``edit.safetensors`` plus ``edit.json`` and loaded back bit-exact (:meth:`Edit.save`,
  :func:`load_edit`);
- chained with others (:meth:`Edit.then`).

The caller's model changes only with ``apply(model, inplace=True)``.

Warning:
    An edit records the shape of the model it was made for (:func:`model_signature`). Applying it to a model of
    another shape raises ValueError. An edit made for a model with the same shape but other weights (another
    checkpoint of the same architecture) is not detected; ``model_name`` in the signature is the only hint.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from excise.completions import position_wise
from excise.io import atomic_folder

FORMAT_VERSION = 1
_SIGNATURE_FIELDS = ("n_layers", "d_model", "d_mlp", "n_heads", "n_key_value_heads", "d_head", "d_vocab")
_REGISTRY: dict[str, type[Edit]] = {}

ForwardHook = tuple[str, Callable[..., Any]]


def model_signature(model: HookedTransformer) -> dict[str, Any]:
    """Shape of a model that an edit depends on, plus its name for messages."""
    signature: dict[str, Any] = {field: getattr(model.cfg, field) for field in _SIGNATURE_FIELDS}
    signature["model_name"] = model.cfg.model_name
    return signature


def check_signature(expected: dict[str, Any] | None, model: HookedTransformer) -> None:
    """Raise ValueError when ``model`` does not have the shape an edit was made for."""
    if expected is None:
        return
    actual = model_signature(model)
    mismatched = [f for f in _SIGNATURE_FIELDS if f in expected and expected[f] != actual[f]]
    if mismatched:
        details = ", ".join(f"{f}: edit {expected[f]} vs model {actual[f]}" for f in mismatched)
        raise ValueError(
            f"this edit was made for model {expected.get('model_name')!r} and does not fit model "
            f"{actual['model_name']!r} ({details}); load the model the edit was made for"
        )


class Edit(abc.ABC):
    """Base class of every edit kind; subclasses register under :attr:`kind` for :func:`load_edit`.

    Subclasses implement :meth:`forward_hooks` (unless :attr:`supports_hooks` is False), :meth:`bake` (unless
    :attr:`supports_weights` is False), :meth:`describe`, :meth:`to_parts` and :meth:`from_parts`. An edit that
    depends on the input (resample ablation, conditional SAE clamping) has no exact weight form, so its
    :attr:`supports_weights` is False and :meth:`apply` raises TypeError.
    """

    kind: ClassVar[str]
    supports_hooks: ClassVar[bool] = True
    supports_weights: ClassVar[bool] = True
    signature: dict[str, Any] | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            _REGISTRY[kind] = cls

    @abc.abstractmethod
    def forward_hooks(self, model: HookedTransformer) -> list[ForwardHook]:
        """TransformerLens ``(hook_name, function)`` pairs that realise the edit at inference time."""

    @abc.abstractmethod
    def bake(self, model: HookedTransformer) -> None:
        """Change ``model``'s weights in place to realise the edit. Called by :meth:`apply` on a copy."""

    @abc.abstractmethod
    def describe(self) -> pd.DataFrame:
        """One row per changed component or weight, saying what changes."""

    @abc.abstractmethod
    def to_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON-serialisable settings and named tensors that :meth:`from_parts` turns back into the edit."""

    @classmethod
    @abc.abstractmethod
    def from_parts(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> Edit:
        """Rebuild an edit from :meth:`to_parts` output."""

    @contextlib.contextmanager
    def hooks(self, model: HookedTransformer) -> Iterator[HookedTransformer]:
        """Run the edit as forward hooks on ``model`` inside a ``with`` block; the hooks are always removed."""
        if not self.supports_hooks:
            raise TypeError(f"a {self.kind} edit exists only in weight form; use edit.apply(model) instead of hooks")
        check_signature(self.signature, model)
        hooks = [(name, position_wise(function)) for name, function in self.forward_hooks(model)]
        with model.hooks(fwd_hooks=hooks):  # pyright: ignore[reportArgumentType]
            yield model

    def apply(self, model: HookedTransformer, *, inplace: bool = False) -> HookedTransformer:
        """Return a model whose weights realise the edit: a deep copy, or ``model`` itself with ``inplace=True``."""
        if not self.supports_weights:
            raise TypeError(self.no_weight_form_reason())
        check_signature(self.signature, model)
        target = model if inplace else copy.deepcopy(model)
        self.bake(target)
        return target

    def no_weight_form_reason(self) -> str:
        """The message of the TypeError that :meth:`apply` raises when :attr:`supports_weights` is False."""
        return f"{self!r} depends on the input and has no weight form; run it with edit.hooks(model) instead"

    def then(self, other: Edit) -> Edit:
        """Chain this edit with ``other``, which runs after it."""
        from excise.edit.sequence import EditSequence

        return EditSequence((self, other))

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save as folder ``path`` with ``edit.safetensors`` and ``edit.json``, atomically."""
        config, tensors = self.to_parts()
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "signature": self.signature, "config": config}
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        with atomic_folder(Path(path), overwrite=overwrite) as folder:
            # safetensors refuses an empty dict on some versions, so an edit without tensors writes a marker.
            save_file(tensors or {"_empty": _empty_tensor()}, str(folder / "edit.safetensors"))
            (folder / "edit.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(path)


def load_edit(path: str | Path) -> Edit:
    """Load an edit saved by :meth:`Edit.save`; the kind is read from ``edit.json``."""
    folder = Path(path)
    meta_path = folder / "edit.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no edit.json in {folder}; pass a folder written by Edit.save")
    meta = json.loads(meta_path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {version!r}; this excise reads version {FORMAT_VERSION}")
    kind = meta.get("kind")
    if kind not in _REGISTRY:
        _import_edit_modules()
    if kind not in _REGISTRY:
        raise ValueError(f"{meta_path} has unknown edit kind {kind!r}; known kinds are {sorted(_REGISTRY)}")
    # Cloning gives freshly allocated (aligned) memory: matmul kernels may sum in another order on a tensor that
    # sits at an unaligned offset of the loaded file, which changes results in the last bits.
    tensors = {name: tensor.clone() for name, tensor in load_file(str(folder / "edit.safetensors")).items()}
    tensors.pop("_empty", None)
    edit = _REGISTRY[kind].from_parts(meta["config"], tensors)
    edit.signature = meta.get("signature")
    return edit


def _empty_tensor() -> Tensor:
    import torch

    return torch.zeros(0)


def _import_edit_modules() -> None:
    import excise.edit  # noqa: F401 - registers every bundled edit kind
