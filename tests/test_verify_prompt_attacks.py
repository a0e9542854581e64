import dataclasses

import pandas as pd
import pytest

from excise.verify.accuracy import score_facts
from excise.verify.formats import LETTERS, format_fact
from excise.verify.prompt_attacks import prompt_attack
from tests.verify_helpers import gradient_ascent_model, trained_domain, trained_model, trained_twin


@pytest.fixture(scope="module")
def edited():
    return gradient_ascent_model()


def test_plain_column_matches_score_facts(edited):
    facts = trained_domain().forget
    result = prompt_attack(edited, facts, max_paraphrases=1)
    expected = score_facts(edited, facts).table["correct"].tolist()
    assert result.correct["plain"].tolist() == expected
    assert result.attempts == [
        "plain",
        "paraphrase_1",
        "multiple_choice",
        "fill_in",
        "role_play",
        "ignore_instructions",
    ]


def test_best_of_n_is_at_least_every_attempt_and_counts_any_hit(edited):
    facts = trained_domain().forget
    result = prompt_attack(edited, facts, max_paraphrases=1)
    assert result.best_of_n >= max(result.accuracy().values())
    expected = result.correct.fillna(False).astype(bool).any(axis=1).mean()
    assert result.best_of_n == pytest.approx(expected)
    # The gradient-ascent edit hides the facts behind one phrasing: paraphrases recover some of them.
    assert result.accuracy()["paraphrase_1"] > result.accuracy()["plain"]


def test_best_of_n_chance_formula(edited):
    facts = trained_domain().forget
    result = prompt_attack(edited, facts, max_paraphrases=2)  # each fact has one paraphrase: paraphrase_2 is missing
    assert result.correct["paraphrase_2"].isna().all()
    n_present = result.n_choices.notna().sum(axis=1).iloc[0]
    assert n_present == result.n_attempts - 1
    assert result.best_of_n_chance == pytest.approx(1 - 0.75**n_present)


def test_best_of_n_is_fair_across_models(edited):
    facts = trained_domain().forget
    original = prompt_attack(trained_model(), facts, max_paraphrases=1)
    twin = prompt_attack(trained_twin(), facts, max_paraphrases=1)
    assert original.best_of_n == 1.0
    assert twin.best_of_n < original.best_of_n
    assert original.attempts == twin.attempts


def test_extra_prompts_add_attempts_for_listed_facts_only(edited):
    facts = trained_domain().forget[:3]
    extra = {"other_language": {facts[0].id: "le symbole de elkaka est"}}
    result = prompt_attack(edited, facts, max_paraphrases=0, formats=(), extra_prompts=extra)
    assert result.attempts == ["plain", "other_language"]
    assert pd.isna(result.correct.loc[facts[1].id, "other_language"])
    assert not pd.isna(result.correct.loc[facts[0].id, "other_language"])


def test_multiple_choice_letter_points_at_target(edited):
    fact = trained_domain().forget[0]
    for seed in range(5):
        mc = format_fact(edited, fact, "multiple_choice", seed=seed)
        assert mc is not None
        letter = mc.target.strip()
        line = next(line for line in mc.prompt.split("\n") if line.startswith(f"{letter}."))
        assert line == f"{letter}.{fact.target}"
        assert sorted(c.strip() for c in mc.choices) == list(LETTERS[: len(fact.choices)])


def test_format_checks(edited):
    fact = trained_domain().forget[0]
    with pytest.raises(ValueError, match="prompt format"):
        format_fact(edited, fact, "rhyme")  # type: ignore[arg-type]
    assert format_fact(edited, dataclasses.replace(fact, paraphrases=()), "paraphrase") is None
    assert format_fact(edited, fact, "chat") == fact  # no chat template: the plain prompt
    with pytest.raises(ValueError, match="always included"):
        prompt_attack(edited, [fact], formats=("plain",))
