"""Benchmark locate estimates against real ablations on the default model and the chemistry domain.

The estimating methods are attribution patching on neurons and on heads, and integrated gradients on neurons. For
each, the top ``k`` sites by the ranking score and ``n_random`` others are ablated one at a time with batched
activation patching. The estimate is then compared with the measured drop (:func:`excise.locate.validate.validate`).
The page gets a table per method and fact set, and a scatter of estimate against measurement saved as HTML next
to it.

Usage::

    python bench/bench_validate.py --output docs/benchmarks-validate.md

Timings depend on what else runs on the machine; the page records the CPU count, torch threads and the load
average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from excise.data.bundled import bundled_domain
from excise.data.facts import FACT_SETS
from excise.locate import attribution_patching, compare, integrated_gradients, validate
from excise.models import load
from excise.plots.attribution import plot_validation
from excise.verify.accuracy import score_facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=32, help="known forget and retain facts to score (each)")
    parser.add_argument("--k", type=int, default=20, help="top sites per method to validate")
    parser.add_argument("--n-random", type=int, default=20, help="other sites per method to validate")
    parser.add_argument("--ig-steps", type=int, default=8, help="integrated-gradients steps")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-validate.md"))
    args = parser.parse_args()

    load_before = os.getloadavg()
    model = load()
    domain = bundled_domain("chemistry").limit(2 * args.facts, 0, 2 * args.facts)
    known = [
        fid for which in FACT_SETS if domain.facts(which) for fid in score_facts(model, domain.facts(which)).known_ids()
    ]
    domain = domain.subset(known).limit(args.facts, 0, args.facts)

    runs = {
        "attribution patching, neurons": lambda: attribution_patching(model, domain, kind="neuron", batch_size=32),
        "attribution patching, heads": lambda: attribution_patching(model, domain, kind="head", batch_size=32),
        "integrated gradients, neurons": lambda: integrated_gradients(
            model, domain, kind="neuron", steps=args.ig_steps, batch_size=16
        ),
    }
    validations, rows = [], []
    for name, score in runs.items():
        start = time.perf_counter()
        attribution = score()
        scored = time.perf_counter() - start
        start = time.perf_counter()
        check = validate(attribution, model, domain, k=args.k, n_random=args.n_random, batch_size=16)
        measured = time.perf_counter() - start
        validations.append(check)
        rows.append((name, scored, measured))
        print(f"{name}: scored in {scored:.0f} s, validated in {measured:.0f} s", flush=True)

    figure_path = args.output.with_suffix(".html")
    figure = plot_validation(validations)
    figure.write_html(figure_path, include_plotlyjs="cdn")
    summary = compare(validations)
    load_after = os.getloadavg()
    lines = [
        "# Benchmarks: locate estimates against real ablations",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads. Load average before {load_before[0]:.1f}, after {load_after[0]:.1f}.",
        "",
        f"Model: SmolLM2-135M-Instruct. Facts: {len(domain.forget)} forget and {len(domain.retain)} retain facts of "
        "the chemistry domain that the model knows. Metric: target log-probability (nats), zero ablation at every "
        f"position. Per method, the top {args.k} sites by the ranking score (forget - retain) and {args.n_random} "
        f"random others are ablated one at a time; integrated gradients uses {args.ig_steps} steps.",
        "",
        "| method | scoring (s) | measuring (s) |",
        "|---|---|---|",
        *[f"| {name} | {scored:.1f} | {measured:.1f} |" for name, scored, measured in rows],
        "",
        "Estimate against measurement per fact set (`ranking` is the forget - retain score). Spearman and Pearson "
        "are correlations over the validated sites; mae, rmse and bias are in nats; top_hit_rate is the share of "
        "the top sites by estimate that are also top by measurement among the validated sites.",
        "",
        _table(summary),
        "",
        f"Scatter of estimate against measurement: [{figure_path.name}]({figure_path.name}) (plotly, loads its "
        "script from the plotly CDN).",
        "",
    ]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


def _table(frame) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


if __name__ == "__main__":
    main()
