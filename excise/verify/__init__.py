"""Verify: is the knowledge gone, or only hidden? Metrics, attacks, the deep-forgetting suite and the Report."""

from excise.verify.accuracy import FactScores, score_facts
from excise.verify.behaviour import Behaviour, BehaviourSettings, measure_behaviour
from excise.verify.in_context import InContextResult, in_context_attack
from excise.verify.lens import LensResult, TunedLens, TunedLensSettings, fit_tuned_lens, logit_lens
from excise.verify.probes import ProbeResult, ProbeSettings, probe_layers
from excise.verify.prompt_attacks import PromptAttackResult, prompt_attack
from excise.verify.quantization import QuantizationResult, quantization_attack, quantize_model
from excise.verify.relearn import RelearnCurve, RelearnSettings, relearn, relearn_text
from excise.verify.report import Report, fill_report
from excise.verify.suite import RelearnAttack, SuiteResult, SuiteSettings, budget_settings, run_suite, with_hooks
from excise.verify.summary import AttackSummary, recovery, residual

__all__ = [
    "AttackSummary",
    "Behaviour",
    "BehaviourSettings",
    "FactScores",
    "InContextResult",
    "LensResult",
    "ProbeResult",
    "ProbeSettings",
    "PromptAttackResult",
    "QuantizationResult",
    "RelearnAttack",
    "RelearnCurve",
    "RelearnSettings",
    "Report",
    "SuiteResult",
    "SuiteSettings",
    "TunedLens",
    "TunedLensSettings",
    "budget_settings",
    "fill_report",
    "fit_tuned_lens",
    "in_context_attack",
    "logit_lens",
    "measure_behaviour",
    "probe_layers",
    "prompt_attack",
    "quantization_attack",
    "quantize_model",
    "recovery",
    "relearn",
    "relearn_text",
    "residual",
    "run_suite",
    "score_facts",
    "with_hooks",
]
