import copy

import pytest
import torch

from excise.verify.accuracy import score_facts
from excise.verify.in_context import in_context_attack, with_demonstrations
from tests.verify_helpers import gradient_ascent_model, trained_domain, trained_twin


@pytest.fixture(scope="module")
def model():
    return gradient_ascent_model()


def test_k_zero_equals_plain_scores(model):
    facts = trained_domain().forget
    result = in_context_attack(model, facts[8:], facts[:8], ks=(0, 2))
    plain = score_facts(model, facts[8:])
    assert result.ks == [0, 2]
    assert result.accuracy[0] == plain.accuracy
    torch.testing.assert_close(result.target_logprob[0], plain.mean_target_logprob, rtol=0, atol=1e-6)
    assert result.chance == 0.25 and result.n_facts == 8


def test_demonstrations_are_nested_and_never_the_fact_itself():
    facts = trained_domain().forget
    fact = facts[0]
    two = with_demonstrations(fact, facts, 2, seed=3)
    four = with_demonstrations(fact, facts, 4, seed=3)
    assert four.prompt.startswith(two.prompt[: -len(fact.prompt)])
    lines = four.prompt.split("\n")
    assert len(lines) == 5 and lines[-1] == fact.prompt
    assert f"{fact.prompt}{fact.target}" not in lines
    assert four.target == fact.target and four.distractors == fact.distractors


def test_demonstrations_change_the_answer(model):
    facts = trained_domain().forget
    result = in_context_attack(model, facts[8:], facts[:8], ks=(0, 4, 8))
    assert len(set(result.target_logprob)) == 3  # the prefix reaches the model
    assert result.best_accuracy == max(result.accuracy)


def test_twin_gains_little(model):
    facts = trained_domain().forget
    twin = in_context_attack(trained_twin(), facts[8:], facts[:8], ks=(0, 8))
    assert twin.best_accuracy <= 0.5  # it never saw these facts; chance is 0.25


def test_input_checks(model):
    facts = trained_domain().forget
    with pytest.raises(ValueError, match="only 2 are available"):
        in_context_attack(model, facts[8:], facts[:2], ks=(4,))
    with pytest.raises(ValueError, match="at least one held-out"):
        in_context_attack(model, [], facts)
    with pytest.raises(ValueError, match="ks must be"):
        in_context_attack(model, facts[8:], facts[:8], ks=(-1,))


def test_in_context_overflow_raises_or_skips(model):
    facts = trained_domain().forget
    model = copy.deepcopy(model)
    model.cfg.n_ctx = 24  # room for a question, not for 8 demonstrations before it
    with pytest.raises(ValueError, match="more than the model's context"):
        in_context_attack(model, facts[8:], facts[:8], ks=(0, 8))
    result = in_context_attack(model, facts[8:], facts[:8], ks=(0, 8), too_long="skip")
    assert result.ks == [0]
    assert result.skipped_ks == [8]
    with pytest.raises(ValueError, match="too_long must be"):
        in_context_attack(model, facts[8:], facts[:8], ks=(0,), too_long="truncate")  # type: ignore[arg-type]
