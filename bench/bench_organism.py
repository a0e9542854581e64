"""Benchmark the model organism: training time, what each model knows, relearning, and locate methods scored
against the planted neurons. Writes Markdown.

Run from the repository root::

    python bench/bench_organism.py                      # writes docs/benchmarks-organism.md
    python bench/bench_organism.py --seed 1 --output /tmp/organism.md

Measures, for one seed and the default :class:`excise.models.organism.OrganismConfig`:

1. Training time (wall clock and CPU) of the organism, its twin and the planted model, trained from scratch with
   the cache off.
2. Accuracy by likelihood ranking on forget, neighbour and retain facts, with the training templates and with the
   held-out template, for the organism, the twin, the planted model, the planted model with its reserved neurons
   zero-ablated (baked into the weights), and the planted model with as many random other neurons ablated.
3. Relearning: each model is finetuned (every parameter, Adam) on the forget facts of half the forget entities
   and scored after every few steps on the facts of the other half, which it never trains on.
4. Locate methods on the planted model, ranking every MLP neuron by selectivity (forget minus retain score):
   precision and recall of the top k against the reserved neurons, at k = half, once and twice their number.

Timings depend on the machine and on what else runs on it; the output records the CPU, the thread count and the
load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from excise.data.facts import Domain, Fact
from excise.data.synthetic import prompt_variants
from excise.edit.ablation import ablate
from excise.locate.attribution import Attribution
from excise.models.organism import OrganismConfig, accuracy_table, load_trained, planted_neurons, train_model
from excise.sites import Site
from excise.verify.relearn import RelearnSettings, relearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of world, weights and data order")
    parser.add_argument("--relearn-steps", type=int, default=40, help="finetuning steps of the relearning attack")
    parser.add_argument("--relearn-lr", type=float, default=1e-3, help="Adam learning rate of the relearning attack")
    parser.add_argument("--relearn-batch", type=int, default=16, help="facts per relearning step")
    parser.add_argument(
        "--cache",
        action="store_true",
        help="read and write the models in the excise cache; timings are then those of the run that wrote them",
    )
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-organism.md"), help="Markdown to write")
    args = parser.parse_args()
    load_before = os.getloadavg()
    config = OrganismConfig()
    world = config.make_world(args.seed)
    domain = world.domain(config.forget_topic, config.neighbour_topic)

    models: dict[str, HookedTransformer] = {}
    timing_rows = []
    for role in ("organism", "twin", "planted"):
        if args.cache:
            model, report = load_trained(world, role, seed=args.seed, config=config)
        else:
            model, report = train_model(world, role, seed=args.seed, config=config)
        models[role] = model
        timing_rows.append(
            {
                "model": role,
                "sentences": report.n_sentences,
                "steps": report.steps,
                "wall s": round(report.seconds, 1),
                "CPU s": round(report.cpu_seconds, 1),
                "final loss": round(report.final_loss, 3),
            }
        )
        print(f"trained {role} in {report.seconds:.1f} s ({report.cpu_seconds:.1f} s CPU)", flush=True)
    timing = pd.DataFrame(timing_rows)

    planted = models["planted"]
    reserved = list(planted_neurons(args.seed, config))
    models["planted, reserved ablated"] = ablate(planted, reserved).apply(planted)
    models["planted, random ablated"] = ablate(planted, _random_neurons(planted, reserved, args.seed)).apply(planted)
    accuracy = _accuracy_frame({name: models[name] for name in _ACCURACY_ORDER}, domain)
    print(accuracy.to_string(), flush=True)

    settings = RelearnSettings(
        steps=args.relearn_steps, lr=args.relearn_lr, batch_size=args.relearn_batch, eval_every=5, seed=args.seed
    )
    train_facts, eval_facts = _split_by_entity(domain.forget, args.seed)
    curves = {}
    for name in ("organism", "planted", "planted, reserved ablated", "twin"):
        start = time.perf_counter()
        curves[name] = relearn(models[name], train_facts, eval_facts, settings, description=f"relearning {name}")
        print(f"relearned {name} in {time.perf_counter() - start:.1f} s", flush=True)
    steps = next(iter(curves.values())).steps
    relearning = pd.DataFrame(
        {"step": steps, **{name: [round(value, 3) for value in curve.accuracy] for name, curve in curves.items()}}
    )
    final_losses = {name: round(curve.train_loss[-1], 4) for name, curve in curves.items()}
    print(relearning.to_string(), flush=True)

    locate = _score_locate_methods(planted, domain, reserved)
    print(locate.to_string(), flush=True)

    text = _markdown(
        args,
        config,
        world_repr=repr(world),
        domain=domain,
        timing=timing,
        accuracy=accuracy,
        relearning=relearning,
        final_losses=final_losses,
        n_train=len(train_facts),
        n_eval=len(eval_facts),
        locate=locate,
        n_reserved=len(reserved),
        load=(load_before, os.getloadavg()),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")


_ACCURACY_ORDER = ("organism", "twin", "planted", "planted, reserved ablated", "planted, random ablated")


def _accuracy_frame(models: dict[str, HookedTransformer], domain: Domain) -> pd.DataFrame:
    rows = []
    for name, model in models.items():
        table = accuracy_table(model, domain)
        row: dict[str, object] = {"model": name}
        for _, entry in table.iterrows():
            row[f"{entry['set']} ({entry['prompts']})"] = round(float(entry["accuracy"]), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def _random_neurons(model: HookedTransformer, reserved: Sequence[Site], seed: int) -> list[Site]:
    """As many neurons as ``reserved``, drawn from the other neurons of the same layers."""
    excluded = set(reserved)
    layers = sorted({site.layer for site in reserved if site.layer is not None})
    candidates = [Site.neuron(layer, index) for layer in layers for index in range(model.cfg.d_mlp)]
    candidates = [site for site in candidates if site not in excluded]
    return random.Random(seed).sample(candidates, len(reserved))


def _split_by_entity(facts: Sequence[Fact], seed: int) -> tuple[list[Fact], list[Fact]]:
    """Facts of half the entities (both training templates) for training, the other half's for scoring."""
    subjects = sorted({fact.subject for fact in facts if fact.subject is not None})
    random.Random(seed).shuffle(subjects)
    train_subjects = set(subjects[: len(subjects) // 2])
    train = [fact for fact in facts if fact.subject in train_subjects]
    held_out = [fact for fact in facts if fact.subject not in train_subjects]
    return list(prompt_variants(train, "train")), list(prompt_variants(held_out, "train"))


def _score_locate_methods(model: HookedTransformer, domain: Domain, reserved: Sequence[Site]) -> pd.DataFrame:
    """Precision and recall of each locate method's top neurons against the reserved ones."""
    from excise.locate import activation_patching, attribution_patching, integrated_gradients

    methods: dict[str, Callable[[], Attribution]] = {
        "attribution patching (all positions)": lambda: attribution_patching(model, domain, sets=("forget", "retain")),
        "attribution patching (last position)": lambda: attribution_patching(
            model, domain, sets=("forget", "retain"), positions="last"
        ),
        "integrated gradients": lambda: integrated_gradients(model, domain, sets=("forget", "retain")),
        "activation patching": lambda: activation_patching(model, domain, sets=("forget", "retain")),
    }
    truth = set(reserved)
    n = len(truth)
    rows = []
    for name, run in methods.items():
        start = time.perf_counter()
        attribution = run()
        seconds = time.perf_counter() - start
        for ranking in (None, "forget"):
            row: dict[str, object] = {
                "method": name,
                "ranking": "forget - retain" if ranking is None else "forget only",
                "seconds": round(seconds, 1),
            }
            for k in (n // 2, n, 2 * n):
                found = len(truth & set(attribution.top(k, by=ranking)))
                row[f"precision@{k}"] = round(found / k, 3)
                row[f"recall@{k}"] = round(found / n, 3)
            rows.append(row)
        print(f"scored {name} in {seconds:.1f} s", flush=True)
    return pd.DataFrame(rows)


def _markdown(
    args: argparse.Namespace,
    config: OrganismConfig,
    *,
    world_repr: str,
    domain: Domain,
    timing: pd.DataFrame,
    accuracy: pd.DataFrame,
    relearning: pd.DataFrame,
    final_losses: dict[str, float],
    n_train: int,
    n_eval: int,
    locate: pd.DataFrame,
    n_reserved: int,
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
) -> str:
    n_neurons = config.n_layers * config.d_mlp
    lines = [
        "# Benchmarks: the model organism",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Run {datetime.datetime.now().isoformat(timespec='minutes')} on {_cpu_name()} "
        f"({os.cpu_count()} cores; training uses 1 thread, scoring and relearning {torch.get_num_threads()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}. Load average before "
        f"{load[0][0]:.1f}, after {load[1][0]:.1f}: other jobs shared the machine, so wall times are upper bounds "
        "and CPU times are the better measure of the work.",
        "",
        f"World (seed {args.seed}): {world_repr}. Domain: {domain!r}. Models: {config.n_layers} layers, "
        f"d_model {config.d_model}, {config.n_heads} heads, d_mlp {config.d_mlp}; {config.steps} AdamW steps of "
        f"{config.batch_size} sentences, peak learning rate {config.lr}. Planted model: {n_reserved} reserved neurons "
        f"({config.planted_per_layer} in each of layers {list(config.planted_layers)}) out of {n_neurons}.",
        "",
        "## Training time",
        "",
        _table(timing),
        "",
        f"Total: {timing['wall s'].sum():.1f} s wall, {timing['CPU s'].sum():.1f} s CPU.",
        "",
        "## Accuracy",
        "",
        "Accuracy by likelihood ranking among the target and 3 distractors (chance 0.25). *train*: both training "
        "templates of every fact; *heldout*: the template each fact was not trained with. Ablations are zero "
        "ablations baked into the weights; the random ablation takes as many neurons from the same layers.",
        "",
        _table(accuracy),
        "",
        "## Relearning",
        "",
        f"Full finetuning with Adam (learning rate {args.relearn_lr}, batch {args.relearn_batch}) on the {n_train} "
        f"forget prompts of half the forget entities; held-out accuracy on the {n_eval} prompts of the other half, "
        "which are never trained on.",
        "",
        _table(relearning),
        "",
        "Training loss at the last step (nats per prompt): "
        + ", ".join(f"{name} {loss}" for name, loss in final_losses.items())
        + ". Every model learns the trained half. The values of the trained half are also distractors of the held-out "
        "facts, so finetuning can push held-out accuracy below chance.",
        "",
        "## Locate methods against the planted neurons",
        "",
        f"Each method scores all {n_neurons} MLP neurons of the planted model on its forget and retain facts. "
        f"Precision and recall of the top k neurons against the {n_reserved} reserved ones; random choice has "
        f"precision {n_reserved / n_neurons:.3f}.",
        "",
        _table(locate),
        "",
    ]
    return "\n".join(lines)


def _table(frame: pd.DataFrame) -> str:
    """Format ``frame`` as a GitHub Markdown table (pandas' ``to_markdown`` needs the optional tabulate package)."""
    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
