import dataclasses
import json
import math

import pytest

from excise.edit.ablation import ablate
from excise.sites import Site
from excise.verify.behaviour import BehaviourSettings
from excise.verify.lens import TunedLensSettings
from excise.verify.probes import ProbeSettings
from excise.verify.relearn import RelearnSettings
from excise.verify.report import Report
from excise.verify.suite import CHECKS, RelearnAttack, SuiteSettings, budget_settings, run_suite
from tests.verify_helpers import gradient_ascent_model, trained_domain, trained_model, trained_twin

LORA = RelearnSettings(steps=6, lr=3e-3, batch_size=8, eval_every=3, method="lora", lora_rank=4)
SMALL = SuiteSettings(
    budget="test",
    behaviour=BehaviourSettings(generation_facts=4, max_new_tokens=2, perplexity_texts=4),
    max_paraphrases=1,
    in_context_ks=(0, 2),
    relearn=(
        RelearnAttack("relearn_lora_facts", "facts", LORA),
        RelearnAttack("relearn_lora_text", "forget_text", LORA),
    ),
    probe=ProbeSettings(steps=60),
    quant_bits=(8,),
)
TEXTS = ["the capital of coka is Cka .", "the colour of mika is cka ."]


@pytest.fixture(scope="module")
def result():
    return run_suite(
        gradient_ascent_model(),
        trained_domain(),
        original=trained_model(),
        twin=trained_twin(),
        budget=SMALL,
        generic_texts=TEXTS,
    )


def test_every_check_runs_on_every_model(result):
    for check in (result.behaviour, result.prompt, result.in_context, result.probes, result.lens, result.quantization):
        assert set(check) == {"edited", "original", "twin"}
    assert set(result.relearn) == {"relearn_lora_facts", "relearn_lora_text"}
    assert result.form == "weights"
    assert len(result.split["eval"]) == len(result.split["attack"]) == 8
    assert not set(result.split["eval"]) & set(result.split["attack"])
    assert result.sources["forget_text"] == "domain forget corpus" and result.sources["generic_text"] == "caller"


def test_budgets_are_equal_across_models(result):
    attempts = {label: r.attempts for label, r in result.prompt.items()}
    assert attempts["edited"] == attempts["original"] == attempts["twin"]
    for curves in result.relearn.values():
        assert len({tuple(c.steps) for c in curves.values()}) == 1


def test_summaries_follow_their_definitions(result):
    plain = {label: scores.accuracy for label, scores in result.plain.items()}
    assert plain["original"] == 1.0 and plain["edited"] < 1.0
    by_name = {s.attack: s for s in result.summaries}
    prompt = by_name["prompt_best_of_n"]
    assert prompt.edited_attacked == result.prompt["edited"].best_of_n
    expected = (prompt.edited_attacked - plain["edited"]) / (plain["original"] - plain["edited"])
    assert prompt.recovery == pytest.approx(min(1.0, max(0.0, expected)))
    assert prompt.recovery > 0  # the shallow edit is undone by paraphrases
    assert result.worst_recovery == max(s.recovery for s in result.summaries if not math.isnan(s.recovery))
    assert by_name["relearn_lora_facts"].edited == result.relearn["relearn_lora_facts"]["edited"].accuracy[0]


def test_report_round_trip_and_html(result, tmp_path):
    report = result.to_report(model_name="tiny", domain_name="made-up")
    assert report.metrics["after"]["forget"]["accuracy"] == result.behaviour["edited"].summary()["forget"]["accuracy"]
    assert set(report.metrics) == {"before", "after", "twin"}
    assert report.attacks["relearn_lora_facts"]["curves"]["edited"]["steps"] == [0, 3, 6]
    report.save_json(tmp_path / "report.json")
    loaded = Report.load_json(tmp_path / "report.json")
    assert loaded.verify["summary"]["worst_recovery"] == pytest.approx(result.worst_recovery)
    json.loads((tmp_path / "report.json").read_text())  # strict JSON
    report.save_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "Worst-case recovery" in page and "Linear probe" in page and "Logit lens" in page
    assert page.count("plotly-graph-div") >= 8


def test_existing_metrics_are_kept(result):
    report = Report(model="m", domain="d", metrics={"before": {"forget": {"accuracy": 0.5, "n": 2}}})
    result.to_report(report)
    assert report.metrics["before"] == {"forget": {"accuracy": 0.5, "n": 2}}
    assert "after" in report.metrics


def test_hook_and_weight_forms_measure_the_same_edit():
    original = trained_model()
    edit = ablate(original, [Site.neuron(1, i) for i in range(0, 128, 3)])
    settings = dataclasses.replace(SMALL, checks=("prompt", "quantization"))
    weights = run_suite(edit, trained_domain(), original=original, budget=settings, generic_texts=TEXTS)
    hooks = run_suite(edit, trained_domain(), original=original, form="hooks", budget=settings, generic_texts=TEXTS)
    assert hooks.form == "hooks" and weights.form == "weights"
    assert hooks.plain["edited"].table["target_logprob"].tolist() == pytest.approx(
        weights.plain["edited"].table["target_logprob"].tolist(), abs=1e-4
    )
    assert not hooks.behaviour and not hooks.relearn and set(hooks.quantization) == {"edited", "original"}


def test_input_checks():
    original = trained_model()
    with pytest.raises(ValueError, match="form"):
        run_suite(original, trained_domain(), original=trained_model(), form="baked")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="original model itself"):
        run_suite(original, trained_domain(), original=original)
    with pytest.raises(TypeError, match="HookedTransformer or an Edit"):
        run_suite("model", trained_domain(), original=original)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget"):
        budget_settings("huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown checks"):
        SuiteSettings(checks=("vibes",))  # type: ignore[arg-type]
    assert budget_settings("quick").checks == CHECKS


def test_references_reuse_the_original_and_twin(result):
    original, twin = trained_model(), trained_twin()
    edit = ablate(original, [Site.neuron(1, i) for i in range(0, 128, 5)])
    fresh = run_suite(edit, trained_domain(), original=original, twin=twin, budget=SMALL, generic_texts=TEXTS)
    reused = run_suite(
        edit, trained_domain(), original=original, twin=twin, budget=SMALL, generic_texts=TEXTS, references=result
    )
    assert reused.prompt["original"] is result.prompt["original"]
    assert reused.relearn["relearn_lora_facts"]["twin"] is result.relearn["relearn_lora_facts"]["twin"]
    assert reused.summary_frame().equals(fresh.summary_frame())


def test_references_from_other_conditions_are_rejected(result):
    original = trained_model()
    edit = ablate(original, [Site.neuron(1, 0)])
    with pytest.raises(ValueError, match="seed"):
        run_suite(
            edit, trained_domain(), original=original, budget=SMALL, generic_texts=TEXTS, seed=1, references=result
        )
    with pytest.raises(ValueError, match="budget settings"):
        other = dataclasses.replace(SMALL, quant_bits=(4,))
        run_suite(edit, trained_domain(), original=original, budget=other, generic_texts=TEXTS, references=result)
    with pytest.raises(ValueError, match="text sources"):
        run_suite(edit, trained_domain(), original=original, budget=SMALL, references=result)


def test_tuned_lens_attack_when_fitted():
    settings = dataclasses.replace(
        SMALL, checks=("logit_lens",), tuned_lens=TunedLensSettings(steps=5, batch_tokens=16, learning_rate=1e-2)
    )
    result = run_suite(
        gradient_ascent_model(), trained_domain(), original=trained_model(), budget=settings, generic_texts=TEXTS
    )
    assert set(result.tuned_lens) == {"edited", "original"}
    assert "tuned_lens" in list(result.summary_frame()["attack"])
    assert "tuned_lens" in result.to_report().attacks
    assert budget_settings("default").tuned_lens is None
