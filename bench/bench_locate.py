"""Benchmark the locate methods on the default model and write the results as Markdown.

Measures:

1. Attribution patching over every MLP neuron and attention head of SmolLM2-135M-Instruct on 200 forget and 200
   retain facts of the bundled chemistry domain (one shared forward and backward pass per batch for both kinds):
   wall time and peak resident memory. Target: under 60 s and 6 GB.
2. Batched activation patching against a plain loop of one forward pass per site: wall time of each, their ratio
   (target >= 10x) and the largest difference of the measured drops, for ablation at the last prompt position and
   at every position. The same comparison is repeated in float64 on a few sites, where the two must agree to
   rounding far below 1e-5.

Run from the repository root::

    python bench/bench_locate.py --out docs/benchmarks-locate.md

Timings depend on the machine and on what else runs on it, so the output records the CPU count, torch threads and
the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the report

import torch

from excise.data.bundled import bundled_domain
from excise.locate import attribution_patching_multi, measure_sites
from excise.locate.metric import make_fact_batch, run_metric
from excise.models import load
from excise.sites import Site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--facts", type=int, default=200, help="forget and retain facts for attribution patching")
    parser.add_argument("--patch-facts", type=int, default=16, help="facts for the batched-vs-loop comparison")
    parser.add_argument("--sites", type=int, default=32, help="random neuron sites for the batched-vs-loop comparison")
    parser.add_argument("--batch-size", type=int, default=32, help="facts per pass for attribution patching")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# Benchmarks: locate",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
        _machine(args.threads),
        "",
    ]
    started = time.perf_counter()
    model = load()
    lines.append(
        f"Model: {model.cfg.model_name} ({model.cfg.n_layers} layers, {model.cfg.d_mlp} neurons and "
        f"{model.cfg.n_heads} query / {model.cfg.n_key_value_heads} key-value heads per layer), float32, "
        f"loaded in {time.perf_counter() - started:.1f} s."
    )
    lines.append("")
    domain = bundled_domain().limit(n_forget=args.facts, n_neighbour=0, n_retain=args.facts)
    lines += _attribution_patching(model, domain, args.batch_size)
    lines += _batched_vs_loop(model, domain, args.patch_facts, args.sites)
    lines += _float32_noise_floor(model, domain)
    lines += _float64_identity(domain)
    lines += ["", f"Load average after: {_load()}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def _attribution_patching(model, domain, batch_size: int) -> list[str]:
    before = _peak_gb()
    start = time.perf_counter()
    attributions = attribution_patching_multi(model, domain, kinds=("neuron", "head"), batch_size=batch_size)
    seconds = time.perf_counter() - start
    n_sites = sum(a.n_sites for a in attributions.values())
    peak = _peak_gb()
    return [
        "## Attribution patching, every neuron and head",
        "",
        f"{len(domain.forget)} forget + {len(domain.retain)} retain facts, batch {batch_size}, "
        f"{n_sites} sites ({attributions['neuron'].n_sites} neurons, {attributions['head'].n_sites} heads), "
        "zero reference, all positions.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| wall time | {seconds:.1f} s | < 60 s |",
        f"| peak resident memory (process) | {peak:.2f} GB (before: {before:.2f} GB) | < 6 GB |",
        "",
    ]


def _batched_vs_loop(model, domain, n_facts: int, n_sites: int) -> list[str]:
    facts = domain.forget[:n_facts]
    rng = random.Random(0)
    sites = sorted(
        {Site.neuron(rng.randrange(model.cfg.n_layers), rng.randrange(model.cfg.d_mlp)) for _ in range(n_sites)}
    )
    rows = [
        "## Batched activation patching vs one forward pass per site",
        "",
        f"{len(sites)} random neurons (all layers), {len(facts)} forget facts in batches of 8, zero reference, "
        "metric target log-probability (nats).",
        "",
        "| ablated at | batched | loop | speed-up | max abs difference | max abs drop |",
        "|---|---|---|---|---|---|",
    ]
    for positions in ("last", "all"):
        start = time.perf_counter()
        batched = measure_sites(model, facts, sites, positions=positions, batch_size=8, max_rows=512)
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        loop = measure_sites(model, facts, sites, positions=positions, batch_size=8, strategy="loop")
        loop_s = time.perf_counter() - start
        difference = float((batched.drops - loop.drops).abs().max())
        largest = float(loop.drops.abs().max())
        rows.append(
            f"| {positions} position{'s' if positions == 'all' else ''} | {batched_s:.1f} s | {loop_s:.1f} s | "
            f"{loop_s / batched_s:.1f}x | {difference:.2e} | {largest:.3f} |"
        )
    return [*rows, ""]


def _float32_noise_floor(model, domain) -> list[str]:
    # The same clean metric computed in a batch of 8 and one fact at a time: float32 rounding of the model itself.
    facts = domain.forget[:8]
    with torch.no_grad():
        together = run_metric(model, make_fact_batch(model, facts), "target_logprob")
        alone = torch.cat([run_metric(model, make_fact_batch(model, [fact]), "target_logprob") for fact in facts])
    return [
        f"Float32 noise floor: the clean metric of the same {len(facts)} facts differs by up to "
        f"{float((together - alone).abs().max()):.2e} nats between a batch of {len(facts)} and one fact at a time.",
        "",
    ]


def _float64_identity(domain) -> list[str]:
    model = load(dtype=torch.float64)
    facts = domain.forget[:8]
    sites = [Site.neuron(layer, 7 * layer) for layer in range(0, model.cfg.n_layers, 5)]
    out = [
        "## Equality in float64",
        "",
        f"{len(sites)} neurons, {len(facts)} facts, model in float64. Drops are stored as float32, so a difference "
        "below float32 resolution (about 1e-9 here) shows as 0.",
        "",
        "| ablated at | max abs difference, batched vs loop |",
        "|---|---|",
    ]
    for positions in ("last", "all"):
        batched = measure_sites(model, facts, sites, positions=positions, batch_size=8)
        loop = measure_sites(model, facts, sites, positions=positions, batch_size=8, strategy="loop")
        out.append(f"| {positions} | {float((batched.drops - loop.drops).abs().max()):.2e} |")
    return [*out, ""]


def _machine(threads: int) -> str:
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            memory = f", {int(handle.readline().split()[1]) / 1e6:.0f} GB memory"
    except OSError:
        pass
    return (
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs{memory}, "
        f"Python {platform.python_version()}, torch {torch.__version__} with {threads} thread(s). "
        f"Load average before: {_load()}."
    )


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


if __name__ == "__main__":
    main()
