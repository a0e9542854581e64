"""The Attribution: scores over sites, with the method, metric and data that produced them.

Every locate method returns one. Scores follow one sign convention across methods: a score is the (estimated or
measured) *drop* in the metric when the site is ablated, so a positive score means the site supports the metric.
With per-set scores, the ranking score is usually the selectivity ``forget - retain``: a site that matters for
every fact is a bad target for removing one domain. :meth:`Attribution.selectivity` gives it against any kept set
(``"neighbour"`` shows whether a site is specific to the domain or to its broad topic).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from excise.data.facts import FACT_SETS, Domain
from excise.sites import SITE_KINDS, Site, SiteKind

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformer_lens import HookedTransformer

    from excise.locate.validate import Validation


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Scores per hook over one kind of site.

    Attributes:
        method: Name of the locate method, e.g. ``"attribution_patching"``.
        metric: What the scores measure, e.g. ``"target_logprob"``.
        kind: Kind of site every score addresses.
        scores: Ranking score per hook, a 1-D tensor over that hook's components (``d_mlp`` neurons, ``n_heads``
            heads, ``d_sae`` features or positions). Positive means ablating the site lowers the metric.
        set_scores: Optional scores per fact set (``"forget"``, ``"retain"``, ``"neighbour"``), same layout.
        settings: Method settings and data sizes, kept for the report (JSON-serialisable values only).
        sae_id: SAE name for ``sae_feature`` sites.
    """

    method: str
    metric: str
    kind: SiteKind
    scores: dict[str, Float[Tensor, " component"]]
    set_scores: dict[str, dict[str, Float[Tensor, " component"]]] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    sae_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"Attribution.kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if not self.scores:
            raise ValueError("an Attribution needs scores for at least one hook")
        for hook, values in self.scores.items():
            if values.ndim != 1:
                raise ValueError(f"scores for {hook!r} must be 1-D over components, got shape {tuple(values.shape)}")
        for which, per_hook in self.set_scores.items():
            if set(per_hook) != set(self.scores):
                raise ValueError(f"set_scores[{which!r}] must cover the same hooks as scores")

    @property
    def n_sites(self) -> int:
        return sum(values.numel() for values in self.scores.values())

    def sites(self) -> list[Site]:
        """All sites in hook order, then component order."""
        return [
            Site(hook, index, self.kind, self.sae_id)
            for hook, values in self.scores.items()
            for index in range(len(values))
        ]

    def flat_scores(self, which: str | None = None) -> Float[Tensor, " site"]:
        """Concatenate all ranking scores (or one set's scores) in the order of :meth:`sites`."""
        source = self.scores if which is None else self._set(which)
        return torch.cat([values.detach().float().cpu() for values in source.values()])

    def top(self, k: int, *, by: str | None = None, largest: bool = True, exclude: Collection[Site] = ()) -> list[Site]:
        """Return the ``k`` sites with the highest score (or lowest, with ``largest=False``).

        Args:
            k: Number of sites; at most :attr:`n_sites` minus the excluded ones.
            by: A fact set name to rank by that set's scores instead of the ranking score.
            largest: Rank from the highest score down.
            exclude: Sites never to return, e.g. the massive-activation neurons of
                :func:`excise.locate.outliers.massive_activation_neurons`.
        """
        sites = self.sites()
        excluded = set(exclude)
        mask = torch.tensor([site in excluded for site in sites], dtype=torch.bool)
        available = self.n_sites - int(mask.sum())
        if not 0 <= k <= available:
            raise ValueError(
                f"k must be between 0 and the number of sites ({self.n_sites}"
                + (f", {self.n_sites - available} excluded" if excluded else "")
                + f"), got {k}"
            )
        flat = self.flat_scores(by).clone()
        flat[mask] = -torch.inf if largest else torch.inf
        order = torch.topk(flat, k, largest=largest).indices.tolist()
        return [sites[i] for i in order]

    def to_frame(self) -> pd.DataFrame:
        """Return one row per site: ``hook``, ``layer``, ``index``, ``label``, ``score`` and a column per fact set."""
        sites = self.sites()
        frame = pd.DataFrame(
            {
                "hook": [site.hook for site in sites],
                "layer": [site.layer for site in sites],
                "index": [site.index for site in sites],
                "label": [site.label() for site in sites],
                "score": self.flat_scores().numpy(),
            }
        )
        for which in self.set_scores:
            frame[which] = self.flat_scores(which).numpy()
        return frame

    def selectivity(self, against: str = "retain") -> dict[str, Float[Tensor, " component"]]:
        """Per hook, the forget score minus the score on the kept set ``against`` (``"retain"`` or ``"neighbour"``).

        Positive where ablating the site hurts the forget facts more than the kept ones.
        """
        forget, kept = self._set("forget"), self._set(against)
        return {hook: forget[hook] - kept[hook] for hook in self.scores}

    def cautious(self, weight: float = 2.0, against: str = "retain") -> Attribution:
        """Return a copy ranked by ``forget - weight * |kept|``, with ``kept`` the set ``against``.

        The plain selectivity ``forget - retain`` rewards a site whose estimated retain effect is negative, that is
        a site whose ablation is predicted to *help* the kept facts. First-order estimates of such effects are
        unreliable, and on SmolLM2-135M the top of that ranking is full of them: ablating its top 30 neurons took
        retain accuracy from 1.0 to 0.55 (docs/benchmarks-study.md). Penalising any kept effect, of either sign,
        keeps the sites that matter for the forget facts and little else.
        """
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        forget, kept = self._set("forget"), self._set(against)
        return dataclasses.replace(
            self,
            scores={hook: forget[hook] - weight * kept[hook].abs() for hook in self.scores},
            settings={**self.settings, "ranking": f"forget - {weight:g} * |{against}|"},
        )

    def validate(self, model: HookedTransformer, domain: Domain, **kwargs: Any) -> Validation:
        """Compare these scores with measured ablation effects; see :func:`excise.locate.validate.validate`."""
        from excise.locate.validate import validate

        return validate(self, model, domain, **kwargs)

    def layer_totals(self, which: str | None = None, *, absolute: bool = False) -> pd.Series:
        """Sum of scores per layer (of absolute scores with ``absolute=True``)."""
        frame = self.to_frame()
        column = "score" if which is None else which
        values = frame[column].abs() if absolute else frame[column]
        return pd.Series(values.groupby(frame["layer"]).sum())

    def plot(self, which: str | None = None) -> go.Figure:
        """Per-layer bar chart of scores; see :mod:`excise.plots` for more figures."""
        from excise.plots.attribution import plot_layer_totals

        return plot_layer_totals(self, which)

    def save(self, path: str | Path) -> None:
        """Save as ``scores.safetensors`` plus ``attribution.json`` in folder ``path``."""
        from excise.io import atomic_folder

        tensors = {f"score/{hook}": values.detach().cpu().contiguous() for hook, values in self.scores.items()}
        for which, per_hook in self.set_scores.items():
            tensors.update({f"{which}/{hook}": v.detach().cpu().contiguous() for hook, v in per_hook.items()})
        meta = {
            "method": self.method,
            "metric": self.metric,
            "kind": self.kind,
            "sae_id": self.sae_id,
            "hooks": list(self.scores),
            "sets": list(self.set_scores),
            "settings": self.settings,
        }
        with atomic_folder(Path(path)) as folder:
            save_file(tensors, str(folder / "scores.safetensors"))
            (folder / "attribution.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        folder = Path(path)
        meta_path = folder / "attribution.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no attribution.json in {folder}; pass a folder written by Attribution.save")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(folder / "scores.safetensors"))
        return cls(
            method=meta["method"],
            metric=meta["metric"],
            kind=meta["kind"],
            scores={hook: tensors[f"score/{hook}"] for hook in meta["hooks"]},
            set_scores={which: {hook: tensors[f"{which}/{hook}"] for hook in meta["hooks"]} for which in meta["sets"]},
            settings=meta["settings"],
            sae_id=meta["sae_id"],
        )

    def _set(self, which: str) -> dict[str, Tensor]:
        if which not in self.set_scores:
            raise KeyError(f"no scores for set {which!r}; this attribution has {sorted(self.set_scores)}")
        return self.set_scores[which]


def resolve_sets(domain: Domain, sets: Sequence[str] | None) -> list[str]:
    """The fact sets a method scores: ``sets`` checked against the domain, or every non-empty set by default."""
    if sets is None:
        chosen = [which for which in FACT_SETS if domain.facts(which)]
    else:
        chosen = list(sets)
        if not chosen:
            raise ValueError("sets must name at least one fact set, e.g. ('forget', 'retain')")
        for which in chosen:
            if which not in FACT_SETS:
                raise ValueError(f"unknown fact set {which!r}; expected one of {FACT_SETS}")
            if not domain.facts(which):  # type: ignore[arg-type]
                raise ValueError(f"fact set {which!r} of domain {domain.name!r} is empty; score other sets")
    return chosen


def rank_by_selectivity(
    set_scores: dict[str, dict[str, Tensor]],
) -> tuple[dict[str, Tensor], str]:
    """Compute the ranking score from per-set scores, and describe it.

    ``forget - retain`` when both sets are scored, else ``forget - neighbour``, else the only or first set's score.
    """
    if not set_scores:
        raise ValueError("no set scores to rank by; score at least one fact set")
    if "forget" in set_scores:
        for kept in ("retain", "neighbour"):
            if kept in set_scores:
                forget, other = set_scores["forget"], set_scores[kept]
                return {hook: forget[hook] - other[hook] for hook in forget}, f"forget - {kept}"
    first = next(iter(set_scores))
    return dict(set_scores[first]), first
