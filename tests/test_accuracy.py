import dataclasses

import pytest
import torch

from excise.completions import completion_logprobs
from excise.data.facts import Fact
from excise.verify.accuracy import score_facts
from tests.helpers import toy_domain, toy_model


@pytest.fixture(scope="module")
def model():
    return toy_model()


def test_scores_match_completion_logprobs(model):
    facts = toy_domain().forget
    table = score_facts(model, facts).table
    for fact, row in zip(facts, table.itertuples(), strict=True):
        logprobs = completion_logprobs(model, [fact.prompt] * len(fact.choices), list(fact.choices))
        assert row.target_logprob == pytest.approx(float(logprobs[0]), abs=1e-5)
        assert row.rank == int((logprobs[1:] >= logprobs[0]).sum())
        assert row.correct == (row.rank == 0)


def test_multi_token_choices_use_sequence_path(model):
    fact = Fact("x", "the symbol of gold is", " Au Au", (" Ag", " Fe Fe"))
    row = score_facts(model, [fact]).table.iloc[0]
    expected = completion_logprobs(model, [fact.prompt], [fact.target])[0]
    assert row["target_logprob"] == pytest.approx(float(expected), abs=1e-5)


def test_known_ids_follow_correctness(model):
    scores = score_facts(model, toy_domain().retain)
    assert set(scores.known_ids()) == set(scores.table.loc[scores.table["correct"], "id"])
    assert scores.chance == pytest.approx(0.25)
    assert 0.0 <= scores.accuracy <= 1.0


def test_uniform_model_scores_nothing_known(model):
    # A model with zeroed unembedding gives every choice the same log-prob; ties count as wrong.
    flat = toy_model()
    with torch.no_grad():
        flat.unembed.W_U.zero_()
        flat.unembed.b_U.zero_()
    assert score_facts(flat, toy_domain().forget).accuracy == 0.0


def test_paraphrase_prompts_scored(model):
    facts = toy_domain().forget
    paraphrased = score_facts(model, facts, prompt_of="paraphrase").table
    direct = score_facts(model, [dataclasses.replace(f, prompt=f.paraphrases[0]) for f in facts]).table
    assert paraphrased["target_logprob"].tolist() == pytest.approx(direct["target_logprob"].tolist())
    with pytest.raises(ValueError, match="prompt_of"):
        score_facts(model, facts, prompt_of="question")


def test_empty_fact_list(model):
    scores = score_facts(model, [])
    assert len(scores.table) == 0
    assert scores.summary()["n"] == 0
