"""Benchmark which attacks bring removed knowledge back, for every edit kind, on the organism or the default model.

``--model organism`` (the default): the planted organism (:func:`excise.models.load_organism` with
``variant="planted"``) keeps its forget topic in known MLP neurons and has a twin that never saw the topic, so each
attack can be compared with a model that never knew the facts. ``--model default``: SmolLM2-135M-Instruct on the
bundled chemistry domain, cut to the facts it ranks correctly. There is no twin, so residuals are measured against
chance. Every edit kind of :mod:`excise.edit` is applied and attacked by the verify suite with the ``quick`` budget
(:func:`excise.verify.suite.run_suite`). The original's (and twin's) results are measured once and reused for every
edit kind.

Facts: each fact set is split at random in two halves (``--seed``). Edits that find sites or directions (the
located ablations, direction removal, SAE features) are fitted on the *locate* half; every suite runs on the
*verify* half, so no fact that chose the sites is measured. Edits that take the facts to remove as input (ROME,
MEMIT and the unlearning baselines) are given the verify half's forget facts: they are meant to remove named
facts, and the suite then measures whether those facts come back. The suite splits the verify forget facts again into
the attacker's half and the held-out half it measures.

For some edit kinds the script tries a few settings (candidates), scores each on the verify facts, and attacks
the one with the lowest forget accuracy. Ties go to the highest neighbour and retain accuracy. The page lists
every candidate it tried.

Usage::

    python bench/bench_attacks.py                                  # writes docs/benchmarks-attacks.md
    python bench/bench_attacks.py --model default --output docs/benchmarks-attacks-default.md
    python bench/bench_attacks.py --only npo rmu --output /tmp/attacks.md
    python bench/bench_attacks.py --no-suite --output /tmp/edits.md  # edit accuracies only

Run with ``OMP_NUM_THREADS=1`` on a shared machine; the script also sets one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

import excise.edit as edit
from excise.completions import make_batch
from excise.data.facts import FACT_SETS, Domain, Fact, split_facts
from excise.locate.attribution_patching import attribution_patching
from excise.locate.outliers import massive_activation_neurons
from excise.locate.sae import SAETrainingSettings, train_sae
from excise.models.organism import Organism, load_organism
from excise.verify.accuracy import score_facts
from excise.verify.in_context import with_demonstrations
from excise.verify.suite import SuiteSettings, budget_settings, run_suite
from excise.verify.summary import MIN_REMOVED

# Unlearning settings for the organism (the library defaults are set for SmolLM2-135M and barely move it).
UNLEARN_STEPS = 40
UNLEARN_LR = 3e-4
RMU_STEPS = 100
RMU_LR = 1e-2
RMU_LAYER = 1


@dataclasses.dataclass
class Subject:
    """The model the edits are made to, its references and its facts."""

    name: str
    model: HookedTransformer
    twin: HookedTransformer | None
    domain: Domain
    generic_texts: list[str] | None
    organism: Organism | None = None


@dataclasses.dataclass
class Candidate:
    """One setting of an edit kind: a label for the page and a function that builds the edit."""

    label: str
    build: Callable[[], edit.Edit]


@dataclasses.dataclass
class EditKind:
    """One row of the page: an edit kind, what it was fitted on, the form attacked, and its candidate settings."""

    name: str
    fitted_on: str
    form: str
    candidates: list[Candidate]


@dataclasses.dataclass
class Outcome:
    """Result of one edit kind: every candidate's accuracy, the chosen candidate, and its suite result."""

    kind: EditKind
    tried: list[dict[str, object]]
    chosen: dict[str, object] | None = None
    suite: object = None
    suite_seconds: float = float("nan")
    error: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["organism", "default"], default="organism")
    parser.add_argument("--seed", type=int, default=0, help="seed of the organism, the fact split and the attacks")
    parser.add_argument("--k", type=int, help="neurons of the located ablations (default: 96 organism, 200 default)")
    parser.add_argument("--only", nargs="*", default=[], help="run only edit kinds whose name contains one of these")
    parser.add_argument("--no-suite", action="store_true", help="build and score the edits, skip the attacks")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-attacks.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    load_before = _load_average()
    started = time.perf_counter()

    if args.k is None:
        args.k = 96 if args.model == "organism" else 200
    subject = _organism_subject(args.seed) if args.model == "organism" else _default_subject()
    halves = {which: split_facts(subject.domain.facts(which), 0.5, args.seed) for which in FACT_SETS}
    locate = dataclasses.replace(subject.domain, **{which: halves[which][0] for which in FACT_SETS})
    verify = dataclasses.replace(subject.domain, **{which: halves[which][1] for which in FACT_SETS})
    references = {"original": _accuracies(subject.model, verify)}
    if subject.twin is not None:
        references["twin"] = _accuracies(subject.twin, verify)
    suite_settings = _quick_settings(subject.model, verify, args.seed)
    if subject.organism is not None:
        all_kinds = _edit_kinds(subject.organism, locate, verify, args.k)
    else:
        suite_forget = verify.limit(suite_settings.max_facts).forget
        all_kinds = _default_edit_kinds(subject.model, locate, verify, suite_forget, args.k)
    kinds = [kind for kind in all_kinds if _selected(kind.name, args.only)]
    outcomes = []
    reference_suite = None
    for kind in kinds:
        outcome = _run_kind(kind, subject, verify, suite_settings, args, reference_suite)
        if reference_suite is None and outcome.suite is not None:
            reference_suite = outcome.suite
        outcomes.append(outcome)
        recovery = "" if outcome.suite is None else f", worst-case recovery {_pct(outcome.suite.worst_recovery)}"
        print(f"{kind.name}: {outcome.chosen or outcome.error}{recovery}", flush=True)

    seconds = time.perf_counter() - started
    page = _page(args, subject, locate, verify, references, outcomes, suite_settings, load_before, seconds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    print(f"wrote {args.output}")
    return 0


def _organism_subject(seed: int) -> Subject:
    organism = load_organism(seed, "planted")
    # The organism's vocabulary covers only its corpora, so its retain corpus serves as generic text.
    return Subject(
        "organism", organism.model, organism.twin, organism.domain, list(organism.domain.retain_corpus), organism
    )


def _default_subject() -> Subject:
    """SmolLM2-135M-Instruct and the first 160 facts per set of the chemistry domain that it ranks correctly."""
    from excise.data.bundled import bundled_domain
    from excise.models import load

    model = load()
    domain = bundled_domain("chemistry").limit(160, 160, 160)
    known = [
        f.id for which in FACT_SETS for f in score_facts(model, domain.facts(which)).table.itertuples() if f.correct
    ]
    return Subject("default", model, None, domain.subset(known), None)


DEFAULT_SAE_HOOK = "blocks.12.hook_resid_post"
DEFAULT_SAE_SETTINGS = SAETrainingSettings(
    d_sae=1024, n_tokens=60_000, steps=600, batch_tokens=512, validation_tokens=2048
)
"""The SAE of the locate notebook (cached under the same key, so a run after the notebook trains nothing)."""


def _default_edit_kinds(
    model: HookedTransformer, locate: Domain, verify: Domain, suite_forget: Sequence[Fact], k: int
) -> list[EditKind]:
    """Return every edit kind with the library's defaults, one setting each, for the default model."""
    from excise.data.corpus import generic_corpus

    reference = generic_corpus(n_texts=24, source="bundled")
    prompts = [fact.prompt for which in FACT_SETS for fact in locate.facts(which)]
    state: dict[str, object] = {}

    def located() -> list:
        if "sites" not in state:
            scores = attribution_patching(model, locate, kind="neuron").cautious(2.0)
            state["sites"] = scores.top(k, exclude=massive_activation_neurons(model, prompts))
        return state["sites"]  # type: ignore[return-value]

    middle = model.cfg.n_layers // 2
    hook = f"blocks.{middle}.hook_resid_post"
    forget_prompts = [fact.prompt for fact in locate.forget]
    retain_prompts = [fact.prompt for fact in locate.retain]
    unknown = [edit.RewriteRequest(fact, None) for fact in suite_forget]
    rome_layer = edit.default_layer(model)

    def unlearn(method: str) -> Candidate:
        settings = edit.UNLEARN_DEFAULTS[method]  # type: ignore[index]
        label = (
            f"library defaults: {settings.steps} steps, lr {settings.learning_rate:g}, batch {settings.batch_size}, "
            f"forget data {settings.forget_data}"
        )
        return Candidate(label, lambda: edit.unlearn(model, verify, settings))

    def sae() -> edit.Edit:
        trained = train_sae(model, DEFAULT_SAE_HOOK, texts=generic_corpus(n_texts=3000), settings=DEFAULT_SAE_SETTINGS)
        scores = attribution_patching(model, locate, kind="sae_feature", sae=trained, positions="last").cautious()  # type: ignore[arg-type]
        return edit.sae_feature_edit(model, trained.sae, [site.index for site in scores.top(64)])  # type: ignore[attr-defined]

    return [
        *_ablation_kinds(
            model, located, reference, "located neurons", "locate half",
            f"top {k} by attribution patching, forget - 2 x abs(retain), massive-activation neurons left out",
            f"same {k} neurons", "bundled generic text",
        ),
        EditKind("direction removal", "locate half", "weights", [
            Candidate(f"forget minus retain prompts at `{hook}`, last token, all writes",
                      lambda: edit.remove_direction(
                          model, edit.mean_difference_direction(model, hook, forget_prompts, retain_prompts))),
        ]),
        EditKind("ROME", "suite forget facts", "weights", [
            Candidate(f"make unknown, one ROME edit per fact applied in turn, layer {rome_layer}",
                      lambda: edit.rome_in_turn(model, unknown, rome_layer)),
        ]),
        EditKind("MEMIT", "suite forget facts", "weights", [
            Candidate(f"make unknown, layers {edit.default_layers(model)}, library defaults",
                      lambda: edit.memit(model, unknown)),
        ]),
        EditKind("gradient ascent", "verify forget facts", "weights", [unlearn("gradient_ascent")]),
        EditKind("gradient difference", "verify forget facts", "weights", [unlearn("gradient_difference")]),
        EditKind("NPO", "verify forget facts", "weights", [unlearn("npo")]),
        EditKind("RMU", "verify forget facts and the forget corpus", "weights", [unlearn("rmu")]),
        EditKind("SAE features", "locate half", "hooks", [
            Candidate(f"SAE on `{DEFAULT_SAE_HOOK}` (1024 features), top 64 by attribution patching zeroed", sae),
        ]),
    ]  # fmt: skip


def _edit_kinds(organism: Organism, locate: Domain, verify: Domain, k: int) -> list[EditKind]:
    model = organism.model
    planted = list(organism.planted_sites)
    reference = list(organism.domain.retain_corpus)  # mean and resample values come from text outside the topic
    key_texts = list(organism.domain.retain_corpus) + list(organism.domain.forget_corpus)
    state: dict[str, object] = {}

    def located() -> list:
        if "sites" not in state:
            state["sites"] = attribution_patching(model, locate, kind="neuron").cautious().top(k)
        return state["sites"]  # type: ignore[return-value]

    def second_moments(layers: Sequence[int]) -> dict:
        key = f"moments{tuple(layers)}"
        if key not in state:
            state[key] = edit.key_second_moment(model, layers, key_texts, use_cache=False)
        return state[key]  # type: ignore[return-value]

    forget_prompts = [fact.prompt for fact in locate.forget]
    retain_prompts = [fact.prompt for fact in locate.retain]
    unknown = [edit.RewriteRequest(fact, None) for fact in verify.forget]
    rewrites = [edit.RewriteRequest(fact, _new_target(fact)) for fact in verify.forget]
    memit_layers = edit.default_layers(model)
    rome_layer = edit.default_layer(model)

    def direction(layer: int, position: str, scale: float) -> Candidate:
        hook = f"blocks.{layer}.hook_resid_post"
        return Candidate(
            f"forget minus retain prompts at `{hook}`, {position} token, scale {scale:g}, all writes",
            lambda: edit.remove_direction(
                model,
                edit.mean_difference_direction(model, hook, forget_prompts, retain_prompts, position=position),  # type: ignore[arg-type]
                scale=scale,
            ),
        )

    def memit(requests: list[edit.RewriteRequest], request_kind: str, weight: float) -> Candidate:
        return Candidate(
            f"{request_kind}, layers {memit_layers}, covariance weight {weight:g}",
            lambda: edit.memit(
                model, requests, memit_layers, second_moments=second_moments(memit_layers), covariance_weight=weight
            ),
        )

    def rome(requests: list[edit.RewriteRequest], request_kind: str) -> Candidate:
        return Candidate(
            f"{request_kind}, one ROME edit per fact applied in turn, layer {rome_layer}",
            lambda: edit.rome_in_turn(
                model, requests, rome_layer, second_moment=second_moments([rome_layer])[rome_layer]
            ),
        )

    def unlearn(method: str, steps: int, lr: float, **extra: object) -> Candidate:
        settings = dataclasses.replace(edit.UNLEARN_DEFAULTS[method], steps=steps, learning_rate=lr, **extra)  # type: ignore[index]
        extra_text = ", ".join(f"{name} {value}" for name, value in extra.items())
        label = f"{steps} steps, lr {lr:g}, batch {settings.batch_size}, forget data {settings.forget_data}"
        return Candidate(
            label + (f", {extra_text}" if extra_text else ""), lambda: edit.unlearn(model, verify, settings)
        )

    def sae(hook: str, n_features: int) -> Candidate:
        def build() -> edit.Edit:
            if hook not in state:
                state[hook] = train_sae(model, hook, texts=key_texts, settings=_SAE_SETTINGS, cache=False)
            trained = state[hook]
            scores = attribution_patching(model, locate, kind="sae_feature", sae=trained).cautious()  # type: ignore[arg-type]
            return edit.sae_feature_edit(model, trained.sae, [site.index for site in scores.top(n_features)])  # type: ignore[attr-defined]

        return Candidate(f"SAE on `{hook}`, top {n_features} features zeroed", build)

    return [
        *_ablation_kinds(
            model, lambda: planted, reference, "planted neurons", "none (known sites)",
            f"{len(planted)} planted neurons set to 0", f"{len(planted)} planted neurons", "the retain corpus",
        ),
        *_ablation_kinds(
            model, located, reference, "located neurons", "locate half",
            f"top {k} by attribution patching, forget - 2 x abs(retain)", f"same {k} neurons", "the retain corpus",
        ),
        EditKind("direction removal", "locate half", "weights", [
            direction(layer, position, scale)
            for layer in range(model.cfg.n_layers)
            for position, scale in (("last", 0.0), ("mean", 0.0), ("last", -1.0))
        ]),
        EditKind("ROME", "verify forget facts", "weights", [
            rome(unknown, "make unknown"),
            rome(rewrites, "rewrite to a distractor"),
        ]),
        EditKind("MEMIT", "verify forget facts", "weights", [
            memit(requests, request_kind, weight)
            for requests, request_kind in ((unknown, "make unknown"), (rewrites, "rewrite to a distractor"))
            for weight in (100.0, 1000.0, 10000.0)
        ]),
        EditKind("gradient ascent", "verify forget facts", "weights", [
            unlearn("gradient_ascent", UNLEARN_STEPS, UNLEARN_LR),
        ]),
        EditKind("gradient difference", "verify forget facts", "weights", [
            unlearn("gradient_difference", UNLEARN_STEPS, UNLEARN_LR),
        ]),
        EditKind("NPO", "verify forget facts", "weights", [unlearn("npo", UNLEARN_STEPS, UNLEARN_LR)]),
        EditKind("RMU", "verify forget facts and the forget corpus", "weights", [
            unlearn("rmu", RMU_STEPS, RMU_LR, steering_layer=RMU_LAYER),
        ]),
        EditKind("SAE features", "locate half", "hooks", [
            sae(hook, n)
            for hook in ("blocks.0.hook_mlp_out", "blocks.1.hook_resid_post")
            for n in (64, 256)
        ]),
    ]  # fmt: skip


def _ablation_kinds(
    model: HookedTransformer,
    sites: Callable[[], list],
    reference: Sequence[str],
    neurons: str,
    fitted_on: str,
    zero_label: str,
    same_neurons: str,
    source: str,
) -> list[EditKind]:
    """Return zero, mean and resample ablation of the same neurons as three edit kinds (resample runs as hooks)."""
    return [
        EditKind(f"zero ablation, {neurons}", fitted_on, "weights", [
            Candidate(zero_label, lambda: edit.ablate(model, sites())),
        ]),
        EditKind(f"mean ablation, {neurons}", fitted_on, "weights", [
            Candidate(f"{same_neurons}, mean over {source}",
                      lambda: edit.ablate(model, sites(), "mean", reference=reference)),
        ]),
        EditKind(f"resample ablation, {neurons}", fitted_on, "hooks", [
            Candidate(f"{same_neurons}, resampled from tokens of {source}",
                      lambda: edit.ablate(model, sites(), "resample", reference=reference)),
        ]),
    ]  # fmt: skip


_SAE_SETTINGS = SAETrainingSettings(
    d_sae=512, n_tokens=2000, steps=1000, batch_tokens=256, context=32, validation_tokens=256
)
"""A small SAE, because the organism's corpora contain only about 2,300 tokens after position 0."""


def _quick_settings(model: HookedTransformer, verify: Domain, seed: int) -> SuiteSettings:
    """Return the ``quick`` budget, with only the in-context ``k`` whose prompts fit the model's context.

    NOTE: the suite raises ValueError when a prompt with its demonstrations is longer than the model's context
    (32 tokens for the organism, where 4 demonstrations do not fit). The check below uses the suite's own split and
    prompt builder and keeps the ``k`` that fit.
    """
    settings = budget_settings("quick", seed)
    forget = verify.limit(settings.max_facts).forget
    attack, held_out = split_facts(forget, 1.0 - settings.eval_fraction, seed)
    fitting = []
    for k in settings.in_context_ks:
        prompted = [with_demonstrations(fact, attack, k, seed=seed) for fact in held_out]
        try:
            make_batch(model, [fact.prompt for fact in prompted], [fact.target for fact in prompted])
        except ValueError:
            continue
        fitting.append(k)
    return dataclasses.replace(settings, in_context_ks=tuple(fitting))


def _run_kind(
    kind: EditKind,
    subject: Subject,
    verify: Domain,
    suite_settings: SuiteSettings,
    args: argparse.Namespace,
    references: object = None,
) -> Outcome:
    outcome = Outcome(kind, tried=[])
    built: list[edit.Edit | None] = []
    for candidate in kind.candidates:
        start = time.perf_counter()
        try:
            built_edit = candidate.build()
        except (edit.EditRejectedError, ValueError, TypeError, RuntimeError) as error:
            outcome.tried.append({"settings": candidate.label, "error": f"{type(error).__name__}: {error}"})
            built.append(None)
            continue
        seconds = time.perf_counter() - start
        outcome.tried.append(
            {"settings": candidate.label, "seconds": seconds, **_accuracies(subject.model, verify, built_edit)}
        )
        built.append(built_edit)

    usable = [i for i, built_edit in enumerate(built) if built_edit is not None]
    if not usable:
        outcome.error = "every candidate failed"
        return outcome
    best = min(
        usable, key=lambda i: (outcome.tried[i]["forget"], -outcome.tried[i]["neighbour"], -outcome.tried[i]["retain"])
    )  # type: ignore[operator]
    outcome.chosen = outcome.tried[best]
    if args.no_suite:
        return outcome

    start = time.perf_counter()
    try:
        outcome.suite = run_suite(
            built[best],  # type: ignore[arg-type]
            verify,
            original=subject.model,
            twin=subject.twin,
            form=kind.form,  # type: ignore[arg-type]
            budget=suite_settings,
            seed=args.seed,
            generic_texts=subject.generic_texts,
            references=references,  # type: ignore[arg-type]
        )
    except Exception as error:  # Report and go on, so that one failing edit kind does not hide the others.
        logging.exception("suite failed for %s", kind.name)
        outcome.error = f"suite failed: {type(error).__name__}: {error}"
    outcome.suite_seconds = time.perf_counter() - start
    return outcome


def _new_target(fact: Fact) -> str:
    """Return the first distractor that is not a token prefix of the target, nor the target of it."""
    for distractor in fact.distractors:
        if not distractor.startswith(fact.target) and not fact.target.startswith(distractor):
            return distractor
    return fact.distractors[0]


def _accuracies(model: HookedTransformer, domain: Domain, built_edit: edit.Edit | None = None) -> dict[str, float]:
    if built_edit is None:
        return {which: score_facts(model, domain.facts(which)).accuracy for which in FACT_SETS}
    if built_edit.supports_weights:
        edited = built_edit.apply(model)
        return {which: score_facts(edited, domain.facts(which)).accuracy for which in FACT_SETS}
    with built_edit.hooks(model):
        return {which: score_facts(model, domain.facts(which)).accuracy for which in FACT_SETS}


def _selected(name: str, only: Sequence[str]) -> bool:
    return not only or any(word.lower() in name.lower() for word in only)


def _page(args, subject, locate, verify, references, outcomes, suite_settings, load_before, seconds) -> str:
    load_after = _load_average()
    now = datetime.datetime.now(datetime.timezone.utc)
    model = subject.model
    organism = subject.organism
    baseline = "the twin" if subject.twin is not None else "chance"
    if organism is not None:
        title = "planted organism"
        model_text = (
            f"Model: the planted organism, seed {args.seed} ({model.cfg.n_layers} layers, d_model "
            f"{model.cfg.d_model}, d_mlp {model.cfg.d_mlp}), its forget topic held by "
            f"{len(organism.planted_sites)} planted MLP neurons, and its twin that never saw the topic."
        )
        text_note = (
            "Generic text (perplexity, the benign relearning attack) is the organism's retain corpus: the organism "
            "knows no other words."
        )
    else:
        title = "default model"
        model_text = (
            f"Model: {model.cfg.model_name} (the default model, float32), on the bundled chemistry domain cut to the "
            "first 160 facts per set and then to the facts the model ranks correctly. There is no twin: residuals "
            "are measured against the attack's chance level."
        )
        text_note = "Generic text (perplexity, the benign relearning attack) is `excise.data.corpus.generic_corpus()`."
    twin_text = f"; the twin scores {_accuracy_text(references['twin'])}" if "twin" in references else ""
    lines = [
        f"# Benchmark: which attacks bring removed knowledge back, per edit kind ({title})",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}` (from the repository root), finished "
        f"{now:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s) (`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`), "
        f"Python {platform.python_version()}. Load average (1 min) {load_before:.1f} before, {load_after:.1f} after.",
        "",
        model_text,
        "",
        f"Facts: every set split in halves (seed {args.seed}). Locate half: {_counts(locate)}. Verify half: "
        f"{_counts(verify)}. Accuracy is likelihood ranking of the target among it and 3 distractors (chance 25%). "
        f"On the verify half the original scores {_accuracy_text(references['original'])}{twin_text}.",
        "",
        f"Suite: budget `quick` of `excise.verify.suite.run_suite` (at most {suite_settings.max_facts} facts per "
        "set), every model attacked with the same budget. The suite splits its forget facts again: one half is what "
        "the attacker may use (demonstrations, relearning data, probe training data), the other half is measured. "
        f"{text_note} The references are measured in the first suite and reused by the others (`references=`), so "
        "the first suite time includes them.",
        "",
        "**Recovery** is the share of the removed accuracy that an attack gives back: 0 none, 100% all of it "
        "(`excise.verify.summary`). It is blank when the edit removed less than "
        f"{MIN_REMOVED:.0%} accuracy on the measured facts. **Residual** is what the attack extracts from the edited "
        f"model above what it extracts from {baseline}, as a share of what it extracts from the original: 0 means "
        + (
            "no more than from a model that never learned the facts."
            if subject.twin is not None
            else "no more than guessing."
        ),
        "",
        "## Edits",
        "",
        "Accuracy after the edit on the whole verify half (before the suite's split); time to build the edit.",
        "",
        "| edit kind | fitted on | form attacked | settings | forget | neighbour | retain | edit s | suite s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        chosen = outcome.chosen
        if chosen is None:
            lines.append(f"| {outcome.kind.name} | {outcome.kind.fitted_on} | | {outcome.error} | | | | | |")
            continue
        lines.append(
            f"| {outcome.kind.name} | {outcome.kind.fitted_on} | {outcome.kind.form} | {chosen['settings']} | "
            f"{_pct(chosen['forget'])} | {_pct(chosen['neighbour'])} | {_pct(chosen['retain'])} | "
            f"{chosen['seconds']:.1f} | {_seconds(outcome.suite_seconds)} |"
        )
    if organism is not None:
        lines += ["", *_unlearning_note(), "", *_candidates(outcomes)]
        lines += [
            "",
            f"In-context attack: demonstrations k in {list(suite_settings.in_context_ks)}, the values of the `quick` "
            f"budget ({list(budget_settings('quick', args.seed).in_context_ks)}) whose prompts fit the organism's "
            f"{model.cfg.n_ctx}-token context; the suite raises an error on longer prompts.",
        ]
    else:
        lines += [
            "",
            "Edits that take facts (ROME, MEMIT) get the suite's forget facts; the unlearning baselines train on the "
            "whole verify half's forget facts (and RMU on the forget corpus too), with the library defaults "
            "(`excise.edit.UNLEARN_DEFAULTS`).",
        ]
    suites = [outcome for outcome in outcomes if outcome.suite is not None]
    if suites:
        lines += [
            "",
            *_recovery_table(suites, baseline),
            "",
            *_reference_table(suites[0].suite),
            "",
            *_reading(suites, baseline),
        ]
    failed = [outcome for outcome in outcomes if outcome.error]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {outcome.kind.name}: {outcome.error}" for outcome in failed]
    return "\n".join(lines) + "\n"


def _unlearning_note() -> list[str]:
    return [
        "The unlearning settings were picked for the organism by a short search on this split: the library defaults "
        f"(set for SmolLM2-135M) move it little. Gradient ascent, gradient difference and NPO: {UNLEARN_STEPS} "
        f"steps at learning rate {UNLEARN_LR:g}, other settings at their defaults. RMU: {RMU_STEPS} steps at "
        f"learning rate {RMU_LR:g}, steering layer {RMU_LAYER} (the organism has 3 layers), other settings at their "
        "defaults.",
    ]


def _candidates(outcomes: Sequence[Outcome]) -> list[str]:
    several = [outcome for outcome in outcomes if len(outcome.tried) > 1]
    if not several:
        return []
    lines = [
        "### Settings tried",
        "",
        "Edit kinds with more than one candidate setting; the suite attacked the one with the lowest forget accuracy. "
        "The time of the first SAE candidate on each hook includes training that SAE "
        f"({_SAE_SETTINGS.d_sae} features, {_SAE_SETTINGS.steps} steps on the organism's corpora).",
        "",
        "| edit kind | settings | forget | neighbour | retain | edit s |",
        "|---|---|---|---|---|---|",
    ]
    for outcome in several:
        for row in outcome.tried:
            if "error" in row:
                lines.append(f"| {outcome.kind.name} | {row['settings']} | rejected: {_cell(row['error'])} | | | |")
            else:
                lines.append(
                    f"| {outcome.kind.name} | {row['settings']} | {_pct(row['forget'])} | {_pct(row['neighbour'])} "
                    f"| {_pct(row['retain'])} | {row['seconds']:.1f} |"
                )
    return lines


def _recovery_table(suites: Sequence[Outcome], baseline: str) -> list[str]:
    attacks = list(suites[0].suite.summary_frame()["attack"])
    lines = [
        "## Recovery by attack",
        "",
        f"Each attack cell: recovery / residual against {baseline}. *No attack*: held-out forget accuracy of the "
        "edited model (the suite's measured half). *Worst*: worst-case recovery over the attacks.",
        "",
        "| edit kind | no attack | " + " | ".join(attacks) + " | worst |",
        "|---|---|" + "---|" * len(attacks) + "---|",
    ]
    for outcome in suites:
        frame = outcome.suite.summary_frame().set_index("attack")
        cells = [outcome.kind.name, _pct(frame["edited"].iloc[0])]
        for attack in attacks:
            if attack in frame.index:
                row = frame.loc[attack]
                cells.append(f"{_pct(row['recovery'])} / {_pct(row['residual'])}")
            else:
                cells.append("")
        cells.append(_pct(outcome.suite.worst_recovery))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference_table(suite) -> list[str]:
    frame = suite.summary_frame()
    plain = suite.plain
    has_twin = "twin" in plain
    twin_text = f", twin {_pct(plain['twin'].accuracy)}" if has_twin else ""
    lines = [
        "References (the same in every suite: same facts, seed and budget): held-out forget accuracy without and "
        f"with each attack. Without attack: original {_pct(plain['original'].accuracy)}{twin_text}, on "
        f"{len(suite.split['eval'])} held-out facts, so one fact is {1 / max(1, len(suite.split['eval'])):.0%}.",
        "",
        "| attack | original attacked | twin attacked | chance |"
        if has_twin
        else "| attack | original attacked | chance |",
        "|---|---|---|---|" if has_twin else "|---|---|---|",
    ]
    for row in frame.itertuples():
        twin_cell = f" {_pct(row.twin_attacked)} |" if has_twin else ""
        lines.append(f"| {row.attack} | {_pct(row.original_attacked)} |{twin_cell} {_pct(row.chance)} |")
    if not has_twin:
        return lines
    best_of_n = frame[frame["attack"] == "prompt_best_of_n"]
    if len(best_of_n):
        row = best_of_n.iloc[0]
        lines += [
            "",
            "`prompt_best_of_n` counts a fact as known when any of the prompt formats ranks its target first, so its "
            f"chance level is {_pct(row['chance'])} and the twin reaches {_pct(row['twin_attacked'])} under it. Its "
            "recovery is therefore inflated by chance; read its residual against the twin instead.",
        ]
    one_fact = 1 / max(1, len(suite.split["eval"]))
    thin = [r.attack for r in frame.itertuples() if r.original_attacked - r.twin_attacked < 3 * one_fact - 1e-9]
    if thin:
        lines += [
            "",
            f"Under {', '.join(thin)} the original is less than three held-out facts above the twin, so the "
            "residual of that attack rests on one or two facts.",
        ]
    return lines


def _reading(suites: Sequence[Outcome], baseline: str) -> list[str]:
    """Write a plain reading, generated from the numbers so that it stays true when the page is rerun."""
    lines = ["## Reading", ""]
    for outcome in suites:
        frame = outcome.suite.summary_frame()
        name = outcome.kind.name
        if frame["recovery"].isna().all():
            lines.append(
                f"- **{name}** removed less than {MIN_REMOVED:.0%} of the held-out forget accuracy, so no recovery "
                f"is defined; worst residual {_pct(outcome.suite.worst_residual)}."
            )
            continue
        ranked = frame.dropna(subset=["recovery"]).sort_values("recovery", ascending=False)
        strong = [f"{r.attack} ({_pct(r.recovery)})" for r in ranked.itertuples() if r.recovery >= 0.5]
        some = [f"{r.attack} ({_pct(r.recovery)})" for r in ranked.itertuples() if 0.2 <= r.recovery < 0.5]
        parts = []
        if strong:
            parts.append("most of it comes back under " + ", ".join(strong))
        if some:
            parts.append("some comes back under " + ", ".join(some))
        if not parts:
            parts.append(f"no attack recovers 20% or more (worst {_pct(outcome.suite.worst_recovery)})")
        above_twin = [
            f"{r.attack} ({_pct(r.residual)})" for r in frame.itertuples() if _finite(r.residual) and r.residual >= 0.2
        ]
        tail = (
            f"; residual of 20% or more against {baseline}: " + ", ".join(above_twin)
            if above_twin
            else f"; under every attack it shows less than 20% residual against {baseline}"
        )
        edited = frame["edited"].iloc[0]
        lines.append(f"- **{name}** (held-out forget accuracy {_pct(edited)}): " + "; ".join(parts) + tail + ".")
    return lines


def _counts(domain: Domain) -> str:
    return ", ".join(f"{len(domain.facts(which))} {which}" for which in FACT_SETS)


def _accuracy_text(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{which} {_pct(value)}" for which, value in accuracy.items())


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _pct(value: object) -> str:
    return f"{value:.0%}" if _finite(value) else ""


def _seconds(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) else ""


def _cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


if __name__ == "__main__":
    raise SystemExit(main())
