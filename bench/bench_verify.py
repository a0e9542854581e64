"""Benchmark the deep-forgetting suite on the default model and the bundled chemistry domain.

The edit is the one ``excise run`` makes: a zero ablation of the top ``k`` MLP neurons by attribution patching,
ranked by ``forget - 2 * |retain|`` with the massive-activation neurons left out. It is located on one half of the
facts the model ranks correctly and the suite runs on the other half, so no measured fact was used to find the
neurons. Each budget's wall time per check and its attack summary are written as Markdown.

Usage::

    python bench/bench_verify.py --budget quick --output docs/benchmarks-verify.md
    python bench/bench_verify.py --budget quick default

Targets on 2 CPU cores: ``quick`` under 3 minutes, ``default`` under 20 minutes (suite only, without loading and
locating).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from excise.data.facts import FACT_SETS, split_facts
from excise.edit.ablation import ablate
from excise.locate.attribution_patching import attribution_patching
from excise.locate.outliers import massive_activation_neurons
from excise.verify.accuracy import score_facts
from excise.verify.suite import budget_settings, run_suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", nargs="+", choices=["quick", "default"], default=["quick"])
    parser.add_argument("--k", type=int, default=200, help="neurons to ablate (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=160, help="facts per set before selecting known facts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-verify.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from excise.data.bundled import bundled_domain
    from excise.models import load

    lines = [_header(args)]
    start = time.perf_counter()
    model = load()
    load_seconds = time.perf_counter() - start
    domain = bundled_domain("chemistry").limit(args.limit, args.limit, args.limit)
    start = time.perf_counter()
    known = [
        f.id for which in FACT_SETS for f in score_facts(model, domain.facts(which)).table.itertuples() if f.correct
    ]
    domain = domain.subset(known)
    halves = {which: split_facts(domain.facts(which), 0.5, args.seed) for which in FACT_SETS}
    locate_domain = dataclasses.replace(domain, **{which: halves[which][0] for which in FACT_SETS})
    verify_domain = dataclasses.replace(domain, **{which: halves[which][1] for which in FACT_SETS})
    attribution = attribution_patching(model, locate_domain, kind="neuron").cautious(2.0)
    prompts = [fact.prompt for which in FACT_SETS for fact in locate_domain.facts(which)]
    edit = ablate(model, attribution.top(args.k, exclude=massive_activation_neurons(model, prompts)))
    prepare_seconds = time.perf_counter() - start
    lines.append(
        f"Model loaded in {load_seconds:.0f} s; known facts selected, neurons located and edit built in "
        f"{prepare_seconds:.0f} s. Verify domain: {verify_domain!r}.\n"
    )
    for budget in args.budget:
        settings = budget_settings(budget, args.seed)
        start = time.perf_counter()
        result = run_suite(edit, verify_domain, original=model, budget=settings, seed=args.seed)
        seconds = time.perf_counter() - start
        lines.append(_section(budget, seconds, result))
        print(f"{budget}: {seconds:.0f} s, worst-case recovery {_fmt(result.worst_recovery)}", flush=True)
    organism = _organism_section(args)
    if organism:
        lines.append(organism)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")
    return 0


def _header(args: argparse.Namespace) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        "# Benchmark: deep-forgetting suite (excise.verify)\n\n"
        f"Command: `{shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}`\n\n"
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average at start {load[0]:.1f}.\n\n"
        f"Edit: zero ablation of the top {args.k} MLP neurons by attribution patching (forget - 2 * |retain|, "
        "massive-activation neurons left out), weights form.\n"
    )


def _section(budget: str, seconds: float, result) -> str:
    frame = result.summary_frame()
    columns = ["attack", "edited", "edited_attacked", "original_attacked", "chance", "recovery", "residual"]
    table = ["| " + " | ".join([*columns, "steps_to_half"]) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in frame.itertuples():
        cells = [str(row.attack)] + [_fmt(getattr(row, c)) for c in columns[1:]]
        cells.append(
            "" if row.steps_to_half is None or row.steps_to_half != row.steps_to_half else str(row.steps_to_half)
        )
        table.append("| " + " | ".join(cells) + " |")
    timings = ", ".join(f"{check} {value:.0f} s" for check, value in result.timings.items())
    behaviour = result.behaviour
    extra = ""
    if behaviour:
        parts = []
        for label, b in behaviour.items():
            s = b.summary()
            parts.append(
                f"{label}: forget {s['forget']['accuracy']:.0%} (stated {s['forget']['generation_accuracy']:.0%}), "
                f"neighbour {s['neighbour']['accuracy']:.0%}, retain {s['retain']['accuracy']:.0%}, "
                f"perplexity {s['generic_text']['perplexity']:.1f}"
            )
        extra = "\nBehaviour: " + "; ".join(parts) + ".\n"
    return (
        f"\n## Budget `{budget}`: {seconds:.0f} s\n\nPer check: {timings}.\n{extra}\n"
        f"Worst-case recovery {_fmt(result.worst_recovery)}, worst-case residual {_fmt(result.worst_residual)}.\n\n"
        + "\n".join(table)
        + "\n"
    )


def _organism_section(args: argparse.Namespace) -> str:
    """Run the quick suite on the planted organism with its planted neurons ablated, against the twin."""
    from excise.models import load_organism

    organism = load_organism(args.seed, "planted")
    edit = ablate(organism.model, list(organism.planted_sites))
    start = time.perf_counter()
    # The organism's vocabulary has only the world's words, so its own retain text serves as the benign text.
    result = run_suite(
        edit,
        organism.domain,
        original=organism.model,
        twin=organism.twin,
        budget="quick",
        seed=args.seed,
        generic_texts=list(organism.domain.retain_corpus),
    )
    title = f"quick (planted organism, {len(organism.planted_sites)} planted neurons ablated, with twin)"
    return _section(title, time.perf_counter() - start, result)


def _fmt(value) -> str:
    return "" if value is None or value != value else f"{value:.0%}"


if __name__ == "__main__":
    raise SystemExit(main())
