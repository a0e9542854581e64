import dataclasses

import pytest
import torch

from excise.completions import tokenize_prompt
from excise.verify.lens import (
    TunedLensSettings,
    decode_residual,
    fit_tuned_lens,
    last_position_residuals,
    logit_lens,
    residual_hooks,
)
from excise.verify.probes import ProbeSettings, probe_layers
from tests.helpers import toy_model
from tests.verify_helpers import trained_domain, trained_model

SETTINGS = ProbeSettings(steps=150)


@pytest.fixture(scope="module")
def model():
    return trained_model()


def test_last_layer_lens_equals_model_logits(model):
    facts = trained_domain().forget[:5]
    residuals = last_position_residuals(model, facts, batch_size=2)
    assert residuals.shape == (model.cfg.n_layers + 1, 5, model.cfg.d_model)
    decoded = decode_residual(model, residuals[-1])
    for row, fact in enumerate(facts):
        logits = model(torch.tensor([tokenize_prompt(model, fact.prompt)]))[0, -1]
        torch.testing.assert_close(decoded[row], logits.float(), rtol=1e-4, atol=1e-4)
    assert residual_hooks(model)[0] == "blocks.0.hook_resid_pre"


def test_logit_lens_finds_answer_in_later_layers(model):
    result = logit_lens(model, trained_domain().forget)
    assert result.layers == [0, 1, 2] and result.n_facts == 16
    assert result.choice_accuracy[-1] == 1.0 and result.median_rank[-1] == 0.0
    assert result.median_rank[0] > 0  # the embedding of "is" does not predict a fact's answer
    assert result.mean_logprob[-1] > result.mean_logprob[0]


def test_probe_reads_answer_and_beats_control(model):
    facts = trained_domain().forget
    result = probe_layers(model, facts[:8], facts[8:], SETTINGS)
    assert result.n_train == 8 and result.n_test == 8 and result.chance == 0.25
    # The control task fits its random training labels (the probe has capacity) but cannot predict new facts.
    assert result.control_train_accuracy[-1] >= 0.75
    assert result.test_accuracy[-1] >= 0.625
    assert result.selectivity[-1] >= 0.375


def test_probe_on_untrained_model_is_near_chance():
    model = toy_model()
    from tests.helpers import toy_domain

    domain = toy_domain()
    facts = (*domain.forget, *domain.retain)
    result = probe_layers(model, facts[:8], facts[8:], SETTINGS)
    assert result.best_test_accuracy <= 0.75  # 4 test facts; a random model has nothing to read


def test_probe_input_checks(model):
    facts = trained_domain().forget
    with pytest.raises(ValueError, match="overlap"):
        probe_layers(model, facts[:8], facts[7:], SETTINGS)
    with pytest.raises(ValueError, match="at least 2 training facts"):
        probe_layers(model, facts[:1], facts[8:], SETTINGS)
    with pytest.raises(ValueError, match="steps"):
        ProbeSettings(steps=0)


def _texts():
    domain = trained_domain()
    return [f"{f.prompt}{f.target} ." for f in domain.all_facts()]


def test_tuned_lens_fits_closer_than_logit_lens(model):
    before = [p.requires_grad for p in model.parameters()]
    lens = fit_tuned_lens(model, _texts(), TunedLensSettings(steps=80, batch_tokens=32, learning_rate=1e-2))
    assert [p.requires_grad for p in model.parameters()] == before
    assert lens.weights.shape == (model.cfg.n_layers + 1, model.cfg.d_model, model.cfg.d_model)
    assert lens.kl_tuned_lens[0] < lens.kl_logit_lens[0]
    assert lens.kl_tuned_lens[1] < lens.kl_logit_lens[1]
    assert lens.kl_tuned_lens[-1] == pytest.approx(0.0, abs=1e-6)


def test_logit_lens_with_tuned_lens(model):
    facts = trained_domain().forget
    lens = fit_tuned_lens(model, _texts(), TunedLensSettings(steps=40, batch_tokens=32, learning_rate=1e-2))
    tuned = logit_lens(model, facts, lens=lens)
    plain = logit_lens(model, facts)
    assert tuned.layers == plain.layers
    assert tuned.mean_logprob[-1] == pytest.approx(plain.mean_logprob[-1], abs=1e-5)  # last stream untouched
    zero = dataclasses.replace(lens, weights=torch.zeros_like(lens.weights), biases=torch.zeros_like(lens.biases))
    assert logit_lens(model, facts, lens=zero).mean_logprob == pytest.approx(plain.mean_logprob, abs=1e-5)


def test_tuned_lens_input_checks(model):
    with pytest.raises(ValueError, match="generic texts"):
        fit_tuned_lens(model, ["  "])
    with pytest.raises(ValueError, match="held_out"):
        TunedLensSettings(held_out=1.0)
    lens = fit_tuned_lens(model, _texts(), TunedLensSettings(steps=1))
    with pytest.raises(ValueError, match="streams"):
        lens.translate(torch.zeros(2, 3, model.cfg.d_model))
