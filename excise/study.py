"""The main job: locate, edit and verify one domain in one model, and write a report folder.

A study

1. scores every fact with the original model and keeps the facts it knows (a fact it never knew cannot be
   forgotten);
2. splits the known facts of each set in two halves at random: sites are located on one half and every effect is
   measured on the other, so the reported forgetting generalises beyond the facts used to find the sites;
3. scores every MLP neuron by attribution patching, ranked by a cautious selectivity: the forget effect minus
   twice the size of the retain effect, so that sites predicted to matter for the kept facts in either direction
   rank low (:meth:`~excise.locate.attribution.Attribution.cautious`);
4. ablates the top ``k`` neurons in a copy of the weights, leaving out the massive-activation neurons that hold
   up the first token's attention sink (:mod:`excise.locate.outliers`), whose first-order scores cannot be trusted;
5. measures forget, neighbour and retain accuracy before and after, the trade-off over smaller and larger ``k``,
   and a finetuning relearning attack on the edited and the original model under the same budget;
6. writes ``report.json``, ``report.html``, the saved edit and the scores to a new folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
from transformer_lens import HookedTransformer

from excise.data.facts import FACT_SETS, Domain, split_facts
from excise.edit.ablation import AblationValue, ablate
from excise.io import atomic_folder
from excise.locate.attribution import Attribution
from excise.locate.attribution_patching import attribution_patching
from excise.locate.outliers import massive_activation_neurons
from excise.sites import Site
from excise.verify.accuracy import FactScores, score_facts
from excise.verify.relearn import RelearnSettings, relearn
from excise.verify.report import Report

logger = logging.getLogger(__name__)

SiteKindOption = Literal["neuron", "head"]
SITE_KIND_OPTIONS: tuple[SiteKindOption, ...] = get_args(SiteKindOption)
SuiteOption = Literal["none", "quick", "default"]
SUITE_OPTIONS: tuple[SuiteOption, ...] = get_args(SuiteOption)

QUICK_LIMITS = {"forget": 80, "neighbour": 40, "retain": 80}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one study.

    Attributes:
        model: Model name for :func:`excise.models.load`.
        domain: Name of a bundled domain, or the path of a JSON Lines domain file.
        output: Report folder; must not exist or be empty.
        k: Number of sites to ablate.
        retain_weight: Sites are ranked by ``forget - retain_weight * |retain|`` (see
            :meth:`excise.locate.attribution.Attribution.cautious`); 0 ranks by the forget effect alone.
        exclude_massive: Never ablate the massive-activation neurons of
            :func:`excise.locate.outliers.massive_activation_neurons`, whose scores are not to be trusted.
        kind: ``"neuron"`` (MLP neurons) or ``"head"`` (attention heads).
        ablation: ``"zero"``, or ``"mean"`` over the retain prompts of the locate split.
        seed: Seed of the fact splits and of the relearning attack's data order.
        quick: Use at most :data:`QUICK_LIMITS` facts per set and a shorter relearning attack.
        known_only: Keep only the facts the original model ranks correctly.
        known: A record written by ``excise known`` (:func:`excise.data.known.record_known`) that says which facts
            count as known, instead of this model's own ranking; e.g. the original model's record when the model
            studied is already edited. Implies ``known_only``.
        relearn: The relearning attacker's budget; ``None`` picks the default (shorter with ``quick``).
        sweep: Values of k for the trade-off curve; ``None`` picks fractions and multiples of ``k``.
        suite: Budget of the full verify suite (:func:`excise.verify.suite.run_suite`) run on the held-out facts
            after the relearning attack, or ``"none"`` to skip it (``None`` means ``"none"``). On the default model
            on 2 CPU cores the ``"quick"`` suite adds about 15 minutes to a study (docs/benchmarks-study.md).
        batch_size: Sequences per forward pass.
    """

    model: str = "smollm2-135m-instruct"
    domain: str = "chemistry"
    output: Path = Path("excise-report")
    k: int = 200
    retain_weight: float = 2.0
    exclude_massive: bool = True
    kind: SiteKindOption = "neuron"
    ablation: AblationValue = "zero"
    seed: int = 0
    quick: bool = False
    known_only: bool = True
    known: Path | None = None
    relearn: RelearnSettings | None = None
    sweep: tuple[int, ...] | None = None
    suite: SuiteOption | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in SITE_KIND_OPTIONS:
            raise ValueError(f"kind must be one of {SITE_KIND_OPTIONS}, got {self.kind!r}")
        if self.ablation not in ("zero", "mean"):
            raise ValueError(f"ablation must be 'zero' or 'mean', got {self.ablation!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight must be >= 0, got {self.retain_weight}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.suite is not None and self.suite not in SUITE_OPTIONS:
            raise ValueError(f"suite must be one of {SUITE_OPTIONS}, got {self.suite!r}")

    def suite_budget(self) -> SuiteOption:
        return "none" if self.suite is None else self.suite

    def relearn_settings(self) -> RelearnSettings:
        if self.relearn is not None:
            return self.relearn
        return RelearnSettings(steps=8, eval_every=2, seed=self.seed) if self.quick else RelearnSettings(seed=self.seed)


def check_output_folder(path: Path) -> None:
    """Raise FileExistsError when ``path`` is a file or a folder with files in it."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output folder {path} already exists and is not empty; pass another --output folder")


def load_study_domain(spec: str) -> Domain:
    """Load a bundled domain by name, or a domain file by path."""
    from excise.data.jsonl import load_domain_file

    path = Path(spec)
    if spec.endswith(".jsonl") or path.exists():
        return load_domain_file(path)
    from excise.data.bundled import bundled_domain, bundled_domain_names

    if spec in bundled_domain_names():
        return bundled_domain(spec)
    raise ValueError(
        f"domain {spec!r} is neither a file nor a bundled domain; bundled domains are {bundled_domain_names()}, "
        "or pass the path of a .jsonl file"
    )


def run_study(config: StudyConfig, model: HookedTransformer | None = None) -> Report:
    """Run a whole study and write its report folder; return the Report.

    Args:
        config: Settings. The output folder and the domain are checked before the model is loaded.
        model: An already loaded model to study instead of loading ``config.model``; it is not changed.
    """
    output = Path(config.output)
    check_output_folder(output)
    timings: dict[str, float] = {}
    with _timed(timings, "load"):
        domain = load_study_domain(config.domain)
        known: dict[str, bool] | None = None
        if config.known is not None:
            from excise.data.known import load_known

            known = load_known(config.known, domain)  # A bad record fails here, before the model is loaded.
        if model is None:
            from excise.models import load

            model = load(config.model)
    _check_k(model, config)
    if config.quick:
        domain = domain.limit(QUICK_LIMITS["forget"], QUICK_LIMITS["neighbour"], QUICK_LIMITS["retain"])

    with _timed(timings, "score_before"):
        if known is not None:
            domain, coverage = _recorded_subset(domain, known, config.known)
            all_scores = _score_all(model, domain, config)
        else:
            all_scores = _score_all(model, domain, config)
            domain, coverage = _known_subset(domain, all_scores) if config.known_only else (domain, {})
    locate_domain, eval_domain = _split_domain(domain, config.seed)
    logger.info("locating on %r, measuring on %r", locate_domain, eval_domain)

    with _timed(timings, "locate"):
        attribution = attribution_patching(
            model, locate_domain, kind=config.kind, batch_size=config.batch_size
        ).cautious(config.retain_weight)
        excluded: list[Site] = []
        if config.exclude_massive and config.kind == "neuron":
            prompts = [fact.prompt for which in FACT_SETS for fact in locate_domain.facts(which)]
            excluded = massive_activation_neurons(model, prompts, batch_size=config.batch_size)
        sites = attribution.top(config.k, exclude=excluded)

    with _timed(timings, "edit"):
        reference = [f.prompt for f in locate_domain.retain] if config.ablation == "mean" else []
        edit = ablate(model, sites, config.ablation, reference=reference, batch_size=config.batch_size)
        edited = edit.apply(model)

    with _timed(timings, "verify"):
        before = _restrict(all_scores, eval_domain)
        after = _score_sets(edited, eval_domain, config.batch_size, "after")
        locate_after = _score_sets(edited, locate_domain, config.batch_size, "after, locate split")
        sweep = _sweep(model, attribution, excluded, eval_domain, config)

    with _timed(timings, "relearn"):
        relearn_entry = _relearn_attack(model, edited, eval_domain, config)

    report = Report(
        model=config.model if model.cfg.model_name is None else str(model.cfg.model_name),
        domain=domain.name,
        edit={
            "kind": edit.kind,
            "form": "weights",
            "ablation": config.ablation,
            "site_kind": config.kind,
            "k": len(sites),
            "sites_per_layer": {str(layer): n for layer, n in sorted(Counter(s.layer for s in sites).items())},
        },
        metrics={
            "before": {which: scores.summary() for which, scores in before.items()},
            "after": {which: scores.summary() for which, scores in after.items()},
        },
        attacks={"relearn": relearn_entry},
        locate={
            "method": attribution.method,
            "metric": attribution.metric,
            "kind": attribution.kind,
            "settings": attribution.settings,
            "top_sites": [site.label() for site in sites[:50]],
            "excluded": [site.label() for site in excluded],
            "layer_totals": {
                which: {str(k): float(v) for k, v in attribution.layer_totals(which).items()}
                for which in attribution.set_scores
            },
        },
        timings=timings,
        settings={
            "k": config.k,
            "retain_weight": config.retain_weight,
            "exclude_massive": config.exclude_massive,
            "kind": config.kind,
            "ablation": config.ablation,
            "seed": config.seed,
            "quick": config.quick,
            "known_only": config.known_only,
            "n_facts": {
                "locate": {which: len(locate_domain.facts(which)) for which in FACT_SETS},
                "eval": {which: len(eval_domain.facts(which)) for which in FACT_SETS},
            },
        },
        extra={
            "coverage": coverage,
            "sweep": sweep,
            "locate_split_after": {which: scores.summary() for which, scores in locate_after.items()},
        },
    )
    budget = config.suite_budget()
    if budget != "none" and len(eval_domain.forget) < 4:
        logger.warning("skipping the verify suite: it needs at least 4 held-out forget facts")
        report.extra["suite"] = {"skipped": "fewer than 4 held-out forget facts"}
    elif budget != "none":
        from excise.verify.suite import run_suite

        with _timed(timings, "suite"):
            result = run_suite(edited, eval_domain, original=model, form="weights", budget=budget, seed=config.seed)
        report = result.to_report(report, model_name=report.model, domain_name=report.domain)
    _write_folder(output, report, attribution, edit)
    return report


def _check_k(model: HookedTransformer, config: StudyConfig) -> None:
    per_layer = model.cfg.d_mlp if config.kind == "neuron" else model.cfg.n_heads
    total = model.cfg.n_layers * (per_layer or 0)
    if config.k > total:
        raise ValueError(
            f"k={config.k} is larger than the number of {config.kind} sites in {model.cfg.model_name} ({total}); "
            f"choose k <= {total}"
        )


def _score_all(model: HookedTransformer, domain: Domain, config: StudyConfig) -> dict[str, FactScores]:
    return {
        which: score_facts(model, facts, batch_size=config.batch_size, description=f"scoring {which} facts (before)")
        for which in FACT_SETS
        if (facts := domain.facts(which))
    }


def _known_subset(domain: Domain, scores: dict[str, FactScores]) -> tuple[Domain, dict[str, Any]]:
    known = [fact_id for per_set in scores.values() for fact_id in per_set.known_ids()]
    coverage = {
        which: {"known": len(per_set.known_ids()), "total": len(per_set.table), "accuracy": per_set.accuracy}
        for which, per_set in scores.items()
    }
    subset = domain.subset(known)
    if len(subset.forget) < 4:
        raise ValueError(
            f"the model ranks only {len(subset.forget)} forget facts of domain {domain.name!r} correctly; a study "
            "needs at least 4 known forget facts (pass known_only=False to use all facts)"
        )
    return subset, coverage


def _recorded_subset(domain: Domain, known: dict[str, bool], path: Path | None) -> tuple[Domain, dict[str, Any]]:
    coverage: dict[str, Any] = {"record": str(path)}
    for which in FACT_SETS:
        ids = [fact.id for fact in domain.facts(which)]
        if ids:
            n_known = sum(known[fact_id] for fact_id in ids)
            coverage[which] = {"known": n_known, "total": len(ids), "accuracy": n_known / len(ids)}
    subset = domain.subset([fact_id for fact_id, is_known in known.items() if is_known])
    if len(subset.forget) < 4:
        raise ValueError(
            f"{path} marks only {len(subset.forget)} forget facts of domain {domain.name!r} as known; a study needs "
            "at least 4"
        )
    return subset, coverage


def _restrict(scores: dict[str, FactScores], domain: Domain) -> dict[str, FactScores]:
    """The rows of ``scores`` for the facts of ``domain``, per set."""
    restricted = {}
    for which, per_set in scores.items():
        ids = {fact.id for fact in domain.facts(which)}  # type: ignore[arg-type]
        if ids:
            table = per_set.table
            restricted[which] = FactScores(pd.DataFrame(table[table["id"].isin(list(ids))]).reset_index(drop=True))
    return restricted


def _split_domain(domain: Domain, seed: int) -> tuple[Domain, Domain]:
    halves = {
        which: split_facts(domain.facts(which), 0.5, seed) for which in FACT_SETS if len(domain.facts(which)) >= 2
    }
    locate = dataclasses.replace(domain, **{which: halves[which][0] for which in halves})
    measure = dataclasses.replace(domain, **{which: halves[which][1] for which in halves})
    return locate, measure


def _score_sets(model: HookedTransformer, domain: Domain, batch_size: int, label: str) -> dict[str, FactScores]:
    return {
        which: score_facts(model, domain.facts(which), batch_size=batch_size, description=f"scoring {which} ({label})")
        for which in FACT_SETS
        if domain.facts(which)
    }


def _sweep(
    model: HookedTransformer, attribution: Attribution, excluded: list[Site], domain: Domain, config: StudyConfig
) -> dict[str, Any]:
    """Accuracy per set for several k, with the ablation run as hooks on the original model."""
    if config.quick:
        default = (config.k // 4, config.k, 4 * config.k)
    else:
        default = (config.k // 8, config.k // 4, config.k // 2, config.k, 2 * config.k, 4 * config.k)
    available = attribution.n_sites - len(set(excluded))
    values = tuple(sorted({k for k in (config.sweep or default) if 1 <= k <= available}))
    accuracy: dict[str, list[float]] = {which: [] for which in FACT_SETS if domain.facts(which)}
    reference = [f.prompt for f in domain.retain] if config.ablation == "mean" else []
    for k in values:
        sites = attribution.top(k, exclude=excluded)
        edit = ablate(model, sites, config.ablation, reference=reference, batch_size=config.batch_size)
        with edit.hooks(model):
            for which, scores in _score_sets(model, domain, config.batch_size, f"k={k}").items():
                accuracy[which].append(scores.accuracy)
    return {"k": list(values), "accuracy": accuracy, "form": "hooks"}


def _relearn_attack(
    model: HookedTransformer, edited: HookedTransformer, domain: Domain, config: StudyConfig
) -> dict[str, Any]:
    settings = config.relearn_settings()
    if len(domain.forget) < 2:
        return {"skipped": "fewer than 2 held-out forget facts"}
    train, held_out = split_facts(domain.forget, 0.5, config.seed + 1)
    curves = {
        "edited": relearn(edited, train, held_out, settings, description="relearning (edited)").to_dict(),
        "original": relearn(model, train, held_out, settings, description="relearning (original)").to_dict(),
    }
    return {
        "settings": {**dataclasses.asdict(settings), "method": "full finetuning, Adam"},
        "n_train": len(train),
        "n_eval": len(held_out),
        "curves": curves,
    }


def _write_folder(output: Path, report: Report, attribution: Any, edit: Any) -> None:
    # The folder appears only when everything is written; a failure leaves no partial report behind.
    with atomic_folder(output, overwrite=output.exists()) as folder:
        report.save_json(folder / "report.json")
        report.save_html(folder / "report.html", figures=None)
        edit.save(folder / "edit")
        attribution.save(folder / "scores")
        attribution.to_frame().sort_values("score", ascending=False).to_csv(folder / "scores.csv", index=False)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    logger.info("stage %s started", stage)
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        logger.info("stage %s took %.1f s", stage, timings[stage])
