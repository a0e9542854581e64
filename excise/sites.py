"""Sites: addresses of places in a model that locate methods score and edits change.

A site is a TransformerLens hook name plus an index along that hook's component axis:

- ``neuron``: ``blocks.L.mlp.hook_post``, index = neuron in ``d_mlp``.
- ``head``: ``blocks.L.attn.hook_z``, index = query head in ``n_heads``.
- ``sae_feature``: the SAE's hook name, index = feature in ``d_sae``; ``sae_id`` names the SAE.
- ``residual``: a residual-stream hook such as ``blocks.L.hook_resid_pre``, index = token position.

Warning:
    Grouped-query attention: in models with ``n_key_value_heads < n_heads`` (the default SmolLM2 model has 9 query
    heads sharing 3 key/value heads), ``hook_k`` and ``hook_v`` are indexed by key/value head and each one feeds
    ``n_heads // n_key_value_heads`` query heads. Head sites always address query heads through ``hook_z``, which
    is per query head, so ablating one head never silently ablates its group. :func:`kv_head_of` gives the shared
    key/value head.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, get_args

from transformer_lens import HookedTransformer

SiteKind = Literal["neuron", "head", "sae_feature", "residual"]
SITE_KINDS: tuple[SiteKind, ...] = get_args(SiteKind)

_LAYER = re.compile(r"^blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    """One place in a model: a hook name and an index along its component axis.

    Attributes:
        hook: TransformerLens hook name, e.g. ``"blocks.3.mlp.hook_post"``.
        index: Neuron, query head, SAE feature or token position, by ``kind``.
        kind: What ``index`` counts.
        sae_id: Name of the SAE, for ``sae_feature`` sites only.
    """

    hook: str
    index: int
    kind: SiteKind
    sae_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"Site.kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if self.index < 0:
            raise ValueError(f"Site.index must be >= 0, got {self.index} for hook {self.hook!r}")
        if (self.kind == "sae_feature") != (self.sae_id is not None):
            raise ValueError("Site.sae_id is required for sae_feature sites and must be None for other kinds")

    @property
    def layer(self) -> int | None:
        """Block index parsed from the hook name, or None for hooks outside the blocks (``hook_embed``)."""
        match = _LAYER.match(self.hook)
        return int(match.group(1)) if match else None

    @classmethod
    def neuron(cls, layer: int, index: int) -> Site:
        return cls(f"blocks.{layer}.mlp.hook_post", index, "neuron")

    @classmethod
    def head(cls, layer: int, index: int) -> Site:
        return cls(f"blocks.{layer}.attn.hook_z", index, "head")

    def label(self) -> str:
        """Short label for plots and tables, e.g. ``L3 N1024`` or ``L5 H2``."""
        prefix = {"neuron": "N", "head": "H", "sae_feature": "F", "residual": "P"}[self.kind]
        layer = f"L{self.layer} " if self.layer is not None else ""
        return f"{layer}{prefix}{self.index}"

    def check(self, model: HookedTransformer) -> None:
        """Raise ValueError when the site does not exist in ``model``."""
        if self.kind == "sae_feature":
            return  # checked against the SAE by the code that attaches it
        if self.hook not in model.hook_dict:
            raise ValueError(f"hook {self.hook!r} not found in the model; see model.hook_dict for valid names")
        size = component_size(model, self.kind)
        if size is not None and self.index >= size:
            raise ValueError(
                f"{self.kind} index {self.index} is out of range for hook {self.hook!r}; the model has {size}"
            )


def component_size(model: HookedTransformer, kind: SiteKind) -> int | None:
    """Number of components of one kind per hook, or None where it is not fixed (positions, SAE features)."""
    if kind == "neuron":
        if model.cfg.d_mlp is None:
            raise ValueError("the model has no MLP neurons (cfg.d_mlp is None)")
        return model.cfg.d_mlp
    if kind == "head":
        return model.cfg.n_heads
    return None


def kv_head_of(model: HookedTransformer, head: int) -> int:
    """Key/value head shared by query head ``head``; the head itself without grouped-query attention."""
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    if not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head} is out of range; the model has {model.cfg.n_heads} query heads")
    return head // (model.cfg.n_heads // n_kv)


def neuron_hooks(model: HookedTransformer) -> list[str]:
    """``blocks.L.mlp.hook_post`` for every layer."""
    return [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]


def head_hooks(model: HookedTransformer) -> list[str]:
    """``blocks.L.attn.hook_z`` for every layer."""
    return [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
