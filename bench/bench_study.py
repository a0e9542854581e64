"""Benchmark the main job: time `excise run` (quick and default) and record its trade-off curve over k.

Usage::

    python bench/bench_study.py [--skip-full] [--k 200] [--output docs/benchmarks-study.md]
    python bench/bench_study.py --reports "excise run --quick=runs/quick" "excise run=runs/full"

With ``--reports`` the studies are not run again: the page is written from the report folders of earlier runs
(their stage timings give the total), and only the baseline is timed now.

Timings on a shared machine are noisy, so the same run also times a baseline, the plain transformers forward
pass of the same model on the same batch, and reports every stage as a ratio to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from excise.models import load, load_hf
from excise.study import StudyConfig, run_study


def baseline_forward_seconds(repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one forward pass (batch 32 x 16 tokens) in transformers and in TransformerLens."""
    hf_model, _ = load_hf()
    hooked = load()
    tokens = torch.randint(0, hooked.cfg.d_vocab, (32, 16), generator=torch.Generator().manual_seed(0))
    timings: dict[str, list[float]] = {"hf": [], "hooked": []}
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            hf_model(tokens)
            timings["hf"].append(time.perf_counter() - start)
            start = time.perf_counter()
            hooked(tokens)
            timings["hooked"].append(time.perf_counter() - start)
    return sorted(timings["hf"])[repeats // 2], sorted(timings["hooked"])[repeats // 2]


def run(quick: bool, k: int, folder: Path) -> dict:
    start = time.perf_counter()
    report = run_study(StudyConfig(output=folder, k=k, quick=quick))
    total = time.perf_counter() - start
    data = json.loads((folder / "report.json").read_text())
    return {"total": total, "report": data, "summary": report.summary_line()}


def success_check(data: dict) -> str:
    before, after = data["metrics"]["before"], data["metrics"]["after"]
    forget_before, forget_after = before["forget"]["accuracy"], after["forget"]["accuracy"]
    chance = after["forget"]["chance"]
    retain_drop = before["retain"]["accuracy"] - after["retain"]["accuracy"]
    halfway = forget_after <= forget_before - 0.5 * (forget_before - chance)
    return (
        f"forget {forget_before:.0%} -> {forget_after:.0%} (chance {chance:.0%}; halfway to chance: "
        f"{'yes' if halfway else 'no'}), retain drop {retain_drop * 100:.1f} points "
        f"({'within' if retain_drop <= 0.05 else 'over'} 5)"
    )


def summary_of(data: dict) -> str:
    """Rebuild the one-line summary that `excise run` prints from a report.json."""
    before, after = data["metrics"]["before"], data["metrics"]["after"]
    parts = ", ".join(
        f"{which} {before[which]['accuracy']:.0%} -> {after[which]['accuracy']:.0%}"
        for which in before
        if which in after
    )
    return f"{data['model']} / {data['domain']}: {parts}"


def markdown(
    results: dict[str, dict], hf_seconds: float, hooked_seconds: float, load_before: tuple, *, from_reports: bool
) -> str:
    load_after = os.getloadavg()
    source = (
        "The studies ran earlier as separate `excise run` commands, one at a time; their report folders were read "
        "back with `--reports`, and the total is the sum of their stage timings. The baseline was timed when the "
        "page was written."
        if from_reports
        else "The studies and the baseline ran in this process."
    )
    lines = [
        "# Benchmarks: the main job (`excise run`)",
        "",
        f"Command: `python {shlex.join(sys.argv)}`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}. "
        f"Load average when the page was written: {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        "",
        source,
        "",
        f"Baseline: one forward pass of batch 32 x 16 tokens takes {hf_seconds:.2f} s in transformers and "
        f"{hooked_seconds:.2f} s in TransformerLens (ratio {hooked_seconds / hf_seconds:.2f}).",
        "",
        "| run | total (s) | total / baseline forward | stages (s) |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        stages = ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in result["report"]["timings"].items())
        lines.append(f"| {name} | {result['total']:.0f} | {result['total'] / hf_seconds:.0f} | {stages} |")
    for name, result in results.items():
        data = result["report"]
        locate = data["locate"]
        settings = data["settings"]
        lines += [
            "",
            f"### {name}: {result['summary']}",
            "",
            f"Facts (known, located on / measured on): {settings['n_facts']['locate']} / "
            f"{settings['n_facts']['eval']}. Ranking: {locate['settings'].get('ranking', 'forget - retain')}; "
            f"{len(locate.get('excluded', []))} massive-activation neurons left out; k = {data['edit']['k']}, "
            f"{data['edit']['ablation']} ablation baked into the weights.",
            "",
            success_check(data),
            "",
        ]
        sweep = data["extra"]["sweep"]
        sets = list(sweep["accuracy"])
        lines += ["| k | " + " | ".join(sets) + " |", "| --- |" + " --- |" * len(sets)]
        for index, k in enumerate(sweep["k"]):
            lines.append(f"| {k} | " + " | ".join(f"{sweep['accuracy'][s][index]:.0%}" for s in sets) + " |")
        curves = data["attacks"]["relearn"]["curves"]
        lines += ["", "Relearning (held-out forget accuracy by step):", ""]
        for label, curve in curves.items():
            points = ", ".join(f"{s}: {a:.0%}" for s, a in zip(curve["steps"], curve["accuracy"], strict=True))
            lines.append(f"- {label}: {points}")
    if not from_reports:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        lines += ["", f"Peak resident memory of the benchmark process: {peak:.1f} GB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=200, help="sites to ablate (default: %(default)s)")
    parser.add_argument("--skip-full", action="store_true", help="run only the --quick study")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-study.md"), help="markdown file")
    parser.add_argument(
        "--reports", nargs="+", metavar="NAME=FOLDER", help="write the page from these report folders instead"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    hf_seconds, hooked_seconds = baseline_forward_seconds()
    results = {}
    if args.reports:
        for entry in args.reports:
            name, _, folder = entry.rpartition("=")
            if not name:
                parser.error(f"--reports takes NAME=FOLDER, got {entry!r}")
            data = json.loads((Path(folder) / "report.json").read_text())
            # Keys with a slash ("verify/probes") time the parts of a stage and are already in its total.
            total = sum(seconds for stage, seconds in data["timings"].items() if "/" not in stage)
            results[name] = {"total": total, "report": data, "summary": summary_of(data)}
        text = markdown(results, hf_seconds, hooked_seconds, load_before, from_reports=True)
        args.output.write_text(text)
        print(text)
        return
    with tempfile.TemporaryDirectory() as scratch:
        results["excise run --quick"] = run(True, args.k, Path(scratch) / "quick")
        if not args.skip_full:
            results["excise run"] = run(False, args.k, Path(scratch) / "full")
    text = markdown(results, hf_seconds, hooked_seconds, load_before, from_reports=False)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
