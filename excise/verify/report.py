"""The Report: every measurement of a study with its settings, written as JSON and as a self-contained HTML page.

``report.json`` is the record a script reads; ``report.html`` is the page a person reads, with plotly figures and
plotly.js inlined so it opens without network access.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from excise.io import atomic_write_text

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclasses.dataclass
class Report:
    """Results of one study.

    Attributes:
        model: Model name.
        domain: Domain name.
        edit: What was changed: ``kind``, ``form`` (``"weights"`` for a baked edit, ``"hooks"`` for an
            inference-time edit) and a summary.
        metrics: Per model state (``"before"``, ``"after"``, and ``"twin"`` where one exists), per fact set
            (``"forget"``, ``"neighbour"``, ``"retain"``), the summary of :class:`excise.verify.accuracy.FactScores`.
        attacks: Per attack name, its settings and results (JSON-serialisable).
        locate: The locate method, its settings and the selected sites.
        timings: Seconds per stage.
        settings: Study settings (seed, k, data sizes).
        extra: Any other JSON-serialisable results (e.g. the trade-off sweep over k).
    """

    model: str
    domain: str
    edit: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    attacks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    locate: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(dataclasses.asdict(self))

    def save_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> Report:
        data = json.loads(Path(path).read_text())
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in fields})

    def summary_line(self) -> str:
        """One line with forget, neighbour and retain accuracy before and after the edit."""
        parts = []
        for which in ("forget", "neighbour", "retain"):
            before = self.metrics.get("before", {}).get(which)
            after = self.metrics.get("after", {}).get(which)
            if before and after:
                parts.append(f"{which} {before['accuracy']:.0%} -> {after['accuracy']:.0%}")
        return f"{self.model} / {self.domain}: " + ", ".join(parts)

    def save_html(self, path: str | Path, figures: list[go.Figure] | None = None) -> None:
        """Write a self-contained page: a summary table, the figures, and the full JSON."""
        import plotly.io as pio

        from excise.plots.report import report_figures

        figures = report_figures(self) if figures is None else figures
        blocks = []
        for number, figure in enumerate(figures):
            blocks.append(pio.to_html(figure, full_html=False, include_plotlyjs=number == 0, default_width="100%"))
        page = _PAGE.format(
            title=html.escape(f"excise report: {self.model} / {self.domain}"),
            summary=html.escape(self.summary_line()),
            table=_metrics_table(self),
            timings=html.escape(", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())),
            figures="\n".join(f'<div class="figure">{block}</div>' for block in blocks),
            json=html.escape(json.dumps(self.to_dict(), indent=2)),
        )
        atomic_write_text(Path(path), page)


def _metrics_table(report: Report) -> str:
    states = list(report.metrics)
    sets = sorted({which for per_state in report.metrics.values() for which in per_state})
    header = "".join(f"<th>{html.escape(state)}</th>" for state in states)
    rows = []
    for which in sets:
        cells = []
        for state in states:
            entry = report.metrics[state].get(which)
            cells.append(f"<td>{entry['accuracy']:.1%} (n={entry['n']})</td>" if entry else "<td></td>")
        rows.append(f"<tr><th>{html.escape(which)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>accuracy</th>{header}</tr>{''.join(rows)}</table>"


def _clean(value: Any) -> Any:
    """Make a value strict-JSON safe: NaN and infinities become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return _clean(value.item())
    return value


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.8rem; text-align: right; }}
.figure {{ margin: 1.5rem 0; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow-x: auto; font-size: 0.8rem; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
{table}
<p>Timings: {timings}</p>
{figures}
<details><summary>report.json</summary><pre>{json}</pre></details>
</body></html>
"""
