"""Benchmark the main job: time `excise run` (quick and default) and record its trade-off curve over k.

Usage::

    python bench/bench_study.py [--skip-full] [--k 300] [--output docs/benchmarks-study.md]

Timings on a shared machine are noisy, so the same run also times a baseline, the plain transformers forward
pass of the same model on the same batch, and reports every stage as a ratio to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
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


def markdown(results: dict[str, dict], hf_seconds: float, hooked_seconds: float) -> str:
    lines = [
        "## The main job (`excise run`)",
        "",
        f"Command: `python bench/bench_study.py`. Machine: {platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, Python {platform.python_version()}, torch {torch.__version__}.",
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
        lines += ["", f"### {name}: {result['summary']}", "", success_check(data), ""]
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    lines += ["", f"Peak resident memory of the benchmark process: {peak:.1f} GB.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=300, help="sites to ablate (default: %(default)s)")
    parser.add_argument("--skip-full", action="store_true", help="run only the --quick study")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-study.md"), help="markdown file")
    args = parser.parse_args()

    hf_seconds, hooked_seconds = baseline_forward_seconds()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        results["excise run --quick"] = run(True, args.k, Path(scratch) / "quick")
        if not args.skip_full:
            results["excise run"] = run(False, args.k, Path(scratch) / "full")
    text = markdown(results, hf_seconds, hooked_seconds)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
