"""Benchmark excise.edit on the default model: ROME timing, and every edit kind on the chemistry domain.

Run from the repository root:

    python bench/bench_edit.py                       # writes docs/benchmarks-edit.md
    python bench/bench_edit.py --n-facts 12 --output /tmp/bench.md

Measures:

1. Key statistics for ROME (100,000 tokens of generic text at the default layer), computed once in a fresh
   temporary cache folder, then read back from the cache.
2. ROME edit time with cached statistics, and CounterFact-style scores (efficacy, paraphrase, neighbourhood,
   fluency) for a few rewrites.
3. A table: each edit kind on the bundled chemistry domain, with forget, neighbour and retain accuracy (on facts
   the unedited model knows, so it scores 1.0), the change of perplexity on generic text, and the time to
   compute the edit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import excise.edit as edit
from excise.data.bundled import bundled_domain
from excise.data.corpus import generic_corpus
from excise.locate import SAETrainingSettings, attribution_patching, train_sae
from excise.locate.outliers import massive_activation_neurons
from excise.models import load
from excise.verify.accuracy import score_facts
from excise.verify.behaviour import perplexity

SAE_HOOK = "blocks.12.hook_resid_post"
SAE_SETTINGS = SAETrainingSettings(d_sae=1024, n_tokens=60_000, steps=600, batch_tokens=512, validation_tokens=2048)
"""The locate notebook's SAE; it is cached under the same key, so after the notebook nothing is trained here."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-facts", type=int, default=24, help="known facts per set (forget, neighbour, retain)")
    parser.add_argument("--n-rome", type=int, default=4, help="facts for the ROME timing")
    parser.add_argument("--k-neurons", type=int, default=200, help="neurons ablated by the ablation rows")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-edit.md"), help="markdown file to write")
    args = parser.parse_args()
    torch.manual_seed(0)

    start = time.perf_counter()
    model = load()
    load_time = time.perf_counter() - start
    domain = bundled_domain("chemistry")
    study = _known_subset(model, domain, args.n_facts)
    generic = generic_corpus(n_texts=32)
    base_ppl, n_tokens = perplexity(model, generic)
    print(f"model loaded in {load_time:.1f} s; {study}; generic perplexity {base_ppl:.2f} on {n_tokens} tokens")

    layer = edit.default_layer(model)
    stats_time, cached_time, second_moment = _statistics_timing(model, layer)
    print(f"key statistics: {stats_time:.1f} s fresh, {cached_time:.2f} s cached")
    rome_rows = _rome_timing(model, study, layer, second_moment, args.n_rome)

    rows = [_row("none (original)", model, None, study, generic, base_ppl, 0.0)]
    for name, build in _edits(model, study, args.k_neurons):
        start = time.perf_counter()
        built = build()
        elapsed = time.perf_counter() - start
        rows.append(_row(name, model, built, study, generic, base_ppl, elapsed))
        print(rows[-1], flush=True)
    _write(args, load_time, stats_time, cached_time, rome_rows, rows, study)


def _known_subset(model, domain, n):
    keep = []
    for which in ("forget", "neighbour", "retain"):
        facts = [f for f in domain.facts(which)[: 4 * n] if which != "forget" or f.subject]
        scores = score_facts(model, facts)
        keep += [f.id for f, ok in zip(facts, scores.table["correct"], strict=True) if ok][:n]
    return domain.subset(keep)


def _statistics_timing(model, layer):
    previous = os.environ.get("EXCISE_CACHE")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["EXCISE_CACHE"] = folder
        try:
            # Load the corpus first so that its one-time download is not counted.
            from excise.data.corpus import corpus_texts

            corpus_texts()
            start = time.perf_counter()
            edit.key_second_moment(model, [layer])
            fresh = time.perf_counter() - start
            start = time.perf_counter()
            second_moment = edit.key_second_moment(model, [layer])[layer]
            cached = time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("EXCISE_CACHE", None)
            else:
                os.environ["EXCISE_CACHE"] = previous
    return fresh, cached, second_moment


def _rome_timing(model, study, layer, second_moment, n):
    rows = []
    neighbours = list(study.neighbour[:12])
    for fact in study.forget[:n]:
        request = edit.RewriteRequest(fact, _new_target(fact))
        start = time.perf_counter()
        try:
            rome_edit = edit.rome(model, request, layer, second_moment=second_moment)
        except edit.EditRejectedError as error:
            rows.append({"fact": fact.id, "new target": request.new_target, "rejected": str(error)})
            continue
        elapsed = time.perf_counter() - start
        scores = edit.rewrite_scores(model, rome_edit.apply(model), [request], neighbours, max_new_tokens=20)
        rows.append(
            {
                "fact": fact.id,
                "new target": repr(request.new_target),
                "time (s)": round(elapsed, 1),
                "steps": rome_edit.info["steps"],
                "efficacy": scores.efficacy,
                "paraphrase": round(scores.paraphrase, 2),
                "neighbourhood": f"{scores.neighbourhood_before:.2f} -> {scores.neighbourhood_after:.2f}",
                "fluency": f"{scores.fluency_before:.2f} -> {scores.fluency_after:.2f}",
                "spillover": round(rome_edit.info["spillover"], 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _new_target(fact):
    """The first distractor that is not a prefix of the target or the other way round (" H" and " Hf" are both
    read as " H" first, so comparing their probabilities says nothing about the edit)."""
    for distractor in fact.distractors:
        if not distractor.startswith(fact.target) and not fact.target.startswith(distractor):
            return distractor
    return fact.distractors[0]


def _edits(model, study, k):
    reference = generic_corpus(n_texts=24, source="bundled")
    prompts = {which: [f.prompt for f in study.facts(which)] for which in ("forget", "neighbour", "retain")}
    state: dict[str, list] = {}

    def sites():
        # The ranking of `excise run`: forget - 2 * |retain|, without the massive-activation neurons.
        if "sites" not in state:
            massive = massive_activation_neurons(model, [p for group in prompts.values() for p in group])
            state["sites"] = attribution_patching(model, study, kind="neuron").cautious(2.0).top(k, exclude=massive)
        return state["sites"]

    def sae_features():
        sae = train_sae(model, SAE_HOOK, texts=generic_corpus(n_texts=3000), settings=SAE_SETTINGS)
        scores = attribution_patching(model, study, kind="sae_feature", sae=sae, positions="last").cautious()
        return edit.sae_feature_edit(model, sae.sae, [site.index for site in scores.top(64)])

    middle = model.cfg.n_layers // 2
    forget_requests = [edit.RewriteRequest(f, None) for f in study.forget]
    rewrite_requests = [edit.RewriteRequest(f, _new_target(f)) for f in study.forget]
    return [
        (
            f"zero ablation, top {k} neurons by forget - 2 x abs(retain) (locate included)",
            lambda: edit.ablate(model, sites(), "zero"),
        ),
        (f"mean ablation, top {k} neurons", lambda: edit.ablate(model, sites(), "mean", reference=reference)),
        (
            f"resample ablation, top {k} neurons (hooks)",
            lambda: edit.ablate(model, sites(), "resample", reference=reference),
        ),
        (
            f"direction removal (mean difference at layer {middle})",
            lambda: edit.remove_direction(
                model,
                edit.mean_difference_direction(
                    model, f"blocks.{middle}.hook_resid_post", prompts["forget"], prompts["retain"]
                ),
            ),
        ),
        (
            "ROME make-unknown, one edit per forget fact applied in turn",
            lambda: edit.rome_in_turn(model, forget_requests),
        ),
        ("MEMIT make-unknown, all forget facts", lambda: edit.memit(model, forget_requests)),
        ("MEMIT rewrite to a distractor, all forget facts", lambda: edit.memit(model, rewrite_requests)),
        ("gradient ascent (defaults)", lambda: edit.gradient_ascent(model, study)),
        ("gradient difference (defaults)", lambda: edit.gradient_difference(model, study)),
        ("NPO (defaults)", lambda: edit.npo(model, study)),
        ("RMU (defaults)", lambda: edit.rmu(model, study)),
        (
            f"SAE features, top 64 of the `{SAE_HOOK}` SAE zeroed (hooks; SAE training included when not cached)",
            sae_features,
        ),
    ]


def _row(name, model, built, study, generic, base_ppl, elapsed):
    row: dict[str, object] = {"edit": name}
    if built is None or built.supports_weights:
        edited = model if built is None else built.apply(model)
        for which in ("forget", "neighbour", "retain"):
            row[which] = score_facts(edited, study.facts(which)).accuracy
        ppl, _ = perplexity(edited, generic)
    else:
        with built.hooks(model):
            for which in ("forget", "neighbour", "retain"):
                row[which] = score_facts(model, study.facts(which)).accuracy
            ppl, _ = perplexity(model, generic)
    row["perplexity change"] = f"{ppl - base_ppl:+.2f}"
    row["time (s)"] = round(elapsed, 1)
    return row


def _write(args, load_time, stats_time, cached_time, rome_rows, rows, study):
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.1f}"
    )
    rome_times = [row["time (s)"] for row in rome_rows if "time (s)" in row]
    lines = [
        "# excise.edit benchmarks",
        "",
        f"Command: `python bench/bench_edit.py {' '.join(sys.argv[1:])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {machine}.",
        "",
        "## ROME on the default model (SmolLM2-135M-Instruct, float32)",
        "",
        f"- Model load: {load_time:.1f} s.",
        f"- Key statistics (default layer, 100,000 tokens of Wikipedia lead "
        f"sections): {stats_time:.1f} s computed once, {cached_time:.2f} s read from the cache.",
        f"- ROME edit time with cached statistics: mean {sum(rome_times) / max(len(rome_times), 1):.1f} s over "
        f"{len(rome_times)} rewrites (target < 10 s).",
        "",
        _markdown(pd.DataFrame(rome_rows)),
        "",
        "## Every edit kind on the chemistry domain",
        "",
        f"Facts: {len(study.forget)} forget, {len(study.neighbour)} neighbour, {len(study.retain)} retain facts that "
        "the unedited model ranks first among four choices (chance 0.25). Perplexity change on 32 Wikipedia lead "
        "sections (first 128 tokens each). Time is the time to compute the edit; evaluation is not included.",
        "",
        _markdown(pd.DataFrame(rows)),
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")


def _markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    header = "| " + " | ".join(str(column) for column in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "/")


if __name__ == "__main__":
    main()
