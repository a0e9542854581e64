"""The Report: every measurement of a study with its settings, written as JSON and as a self-contained HTML page.

``report.json`` is the record a script reads; ``report.html`` is the page a person reads, with plotly figures and
plotly.js inlined so it opens without network access. :func:`fill_report` writes the results of the
deep-forgetting suite (:func:`excise.verify.suite.run_suite`) into a report.
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

    from excise.verify.suite import SuiteResult


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
        verify: Results of the deep-forgetting suite that are not attacks (see :func:`fill_report`): ``form``,
            ``budget``, ``seed``, ``split``, ``summary`` (worst-case recovery and residual, one row per attack),
            ``behaviour`` (per model, per set), ``sources`` and ``timings``. Empty without a suite run.
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
    verify: dict[str, Any] = dataclasses.field(default_factory=dict)

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
            verify=_verify_section(self),
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


_MODEL_STATES = {"original": "before", "edited": "after", "twin": "twin"}


def fill_report(
    result: SuiteResult, report: Report | None = None, *, model_name: str = "model", domain_name: str = "domain"
) -> Report:
    """Write a suite's results into ``report`` (a new Report when None) and return it.

    Each attack becomes an entry of ``report.attacks`` with ``check``, ``form``, ``settings``, ``results`` (per
    model), ``curves`` (per model, ``x`` or ``steps`` against ``accuracy``), ``x_title``, ``chance`` and
    ``summary`` (:class:`~excise.verify.summary.AttackSummary`). Behaviour, the summary table and the split go to
    ``report.verify``. ``report.metrics`` gets a ``before`` / ``after`` / ``twin`` entry only for model states it
    does not have yet, so the numbers of an ``excise run`` stay as they were.
    """
    report = Report(model=model_name, domain=domain_name) if report is None else report
    report.edit.setdefault("form", result.form)
    summaries = {summary.attack: summary.to_dict() for summary in result.summaries}

    def add(
        name: str,
        check: str,
        settings: Any,
        results: dict[str, Any],
        curves: dict[str, Any],
        x_title: str,
        chance: float,
    ) -> None:
        report.attacks[name] = {
            "check": check,
            "form": result.form,
            "settings": settings,
            "results": results,
            "curves": curves,
            "x_title": x_title,
            "chance": chance,
            "summary": summaries.get(name, {}),
        }

    if result.prompt:
        add(
            "prompt_best_of_n",
            "prompt",
            {"max_paraphrases": result.settings.max_paraphrases, "attempts": result.prompt["original"].attempts},
            {label: r.to_dict() for label, r in result.prompt.items()},
            {
                label: {"x": list(r.accuracy()), "accuracy": list(r.accuracy().values())}
                for label, r in result.prompt.items()
            },
            "prompt format",
            result.prompt["original"].best_of_n_chance,
        )
    if result.in_context:
        add(
            "in_context",
            "in_context",
            {"ks": result.in_context["original"].ks},
            {label: r.to_dict() for label, r in result.in_context.items()},
            {label: {"x": r.ks, "accuracy": r.accuracy} for label, r in result.in_context.items()},
            "demonstrations before the question (k)",
            result.in_context["original"].chance,
        )
    for name, curves in result.relearn.items():
        attack = next(a for a in result.settings.relearn if a.name == name)
        add(
            name,
            "relearn",
            {**dataclasses.asdict(attack.settings), "data": attack.data, "source": result.sources.get(attack.data, "")},
            {label: c.to_dict() for label, c in curves.items()},
            {label: {"steps": c.steps, "accuracy": c.accuracy} for label, c in curves.items()},
            "finetuning step",
            result.plain["original"].chance,
        )
    if result.probes:
        add(
            "probe",
            "probes",
            dataclasses.asdict(result.settings.probe),
            {label: r.to_dict() for label, r in result.probes.items()},
            {label: {"x": r.layers, "accuracy": r.test_accuracy} for label, r in result.probes.items()},
            "residual stream (0 = embedding)",
            result.probes["original"].chance,
        )
    if result.lens:
        add(
            "logit_lens",
            "logit_lens",
            {},
            {label: r.to_dict() for label, r in result.lens.items()},
            {label: {"x": r.layers, "accuracy": r.choice_accuracy} for label, r in result.lens.items()},
            "residual stream (0 = embedding)",
            result.plain["original"].chance,
        )
    if result.tuned_lens:
        add(
            "tuned_lens",
            "tuned_lens",
            dataclasses.asdict(result.settings.tuned_lens) if result.settings.tuned_lens is not None else {},
            {label: r.to_dict() for label, r in result.tuned_lens.items()},
            {label: {"x": r.layers, "accuracy": r.choice_accuracy} for label, r in result.tuned_lens.items()},
            "residual stream (0 = embedding)",
            result.plain["original"].chance,
        )
    if result.quantization:
        add(
            "quantization",
            "quantization",
            {"bits": list(result.settings.quant_bits), "scheme": "per-channel symmetric round-to-nearest"},
            {label: r.to_dict() for label, r in result.quantization.items()},
            {
                label: {"x": ["full" if b is None else f"{b}-bit" for b in r.bits], "accuracy": r.accuracy}
                for label, r in result.quantization.items()
            },
            "weights",
            result.plain["original"].chance,
        )

    behaviour = {label: b.summary() for label, b in result.behaviour.items()}
    for label, per_set in behaviour.items():
        state = _MODEL_STATES[label]
        if state not in report.metrics:
            report.metrics[state] = {which: entry for which, entry in per_set.items() if entry.get("n")}
    report.verify = {
        "form": result.form,
        "budget": result.settings.budget,
        "seed": result.seed,
        "split": {"n_eval": len(result.split["eval"]), "n_attack": len(result.split["attack"]), **result.split},
        "plain": {label: scores.summary() for label, scores in result.plain.items()},
        "summary": {
            "worst_recovery": result.worst_recovery,
            "worst_residual": result.worst_residual,
            "attacks": list(summaries.values()),
        },
        "behaviour": behaviour,
        "examples": {
            label: b.tables["forget"].loc[:, ["id", "completion", "stated"]].dropna().head(8).to_dict(orient="records")
            for label, b in result.behaviour.items()
            if "forget" in b.tables
        },
        "sources": result.sources,
        "timings": result.timings,
    }
    for check, seconds in result.timings.items():
        report.timings[f"verify/{check}"] = seconds
    return report


def _verify_section(report: Report) -> str:
    """HTML of the suite's summary table and behaviour table; empty without a suite run."""
    verify = report.verify
    if not verify:
        return ""
    summary = verify.get("summary", {})
    rows = []
    for entry in summary.get("attacks", []):
        cells = [html.escape(str(entry["attack"]))]
        for key in (
            "edited",
            "edited_attacked",
            "original_attacked",
            "twin_attacked",
            "chance",
            "recovery",
            "residual",
        ):
            cells.append(_percent(entry.get(key)))
        half = entry.get("steps_to_half")
        cells.append("" if half is None else str(half))
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    header = (
        "<tr><th>attack</th><th>edited</th><th>edited, attacked</th><th>original, attacked</th>"
        "<th>twin, attacked</th><th>chance</th><th>recovery</th><th>residual</th><th>steps to half</th></tr>"
    )
    behaviour_rows = []
    for label, per_set in verify.get("behaviour", {}).items():
        for which, entry in per_set.items():
            if which == "generic_text":
                continue
            behaviour_rows.append(
                f"<tr><td>{html.escape(label)}</td><td>{html.escape(which)}</td><td>{_percent(entry.get('accuracy'))}"
                f"</td><td>{_percent(entry.get('generation_accuracy'))}</td><td>{_percent(entry.get('vocab_top10'))}"
                f"</td><td>{_number(entry.get('median_vocab_rank'))}</td>"
                f"<td>{_number(per_set.get('generic_text', {}).get('perplexity'))}</td></tr>"
            )
    behaviour_header = (
        "<tr><th>model</th><th>set</th><th>accuracy (ranking)</th><th>stated in chat (greedy)</th>"
        "<th>target in top 10</th><th>median vocabulary rank</th><th>perplexity (generic text)</th></tr>"
    )
    split = verify.get("split", {})
    return (
        f"<h2>Deep-forgetting checks ({html.escape(str(verify.get('form')))} edit, budget "
        f"{html.escape(str(verify.get('budget')))})</h2>"
        f"<p>Worst-case recovery: <b>{_percent(summary.get('worst_recovery'))}</b>; worst-case residual: "
        f"<b>{_percent(summary.get('worst_residual'))}</b>. Attacks are measured on {split.get('n_eval')} held-out "
        f"forget facts; the attacker uses the other {split.get('n_attack')}. Recovery is the share of the removed "
        "accuracy that an attack brings back; residual is what the attacked edited model shows above a "
        "never-learned baseline (the twin, else chance), as a share of the attacked original's.</p>"
        f"<table>{header}{''.join(rows)}</table>"
        f"<table>{behaviour_header}{''.join(behaviour_rows)}</table>"
    )


def _percent(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.0%}"


def _number(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4g}"


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
{verify}
{figures}
<details><summary>report.json</summary><pre>{json}</pre></details>
</body></html>
"""
