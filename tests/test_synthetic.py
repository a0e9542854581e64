import collections
import random

import numpy as np
import pytest
import torch

from excise.data.synthetic import (
    N_DISTRACTORS,
    RELATIONS,
    TOPICS,
    heldout_prompt,
    make_world,
    prompt_variants,
    train_prompts,
)


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def test_world_is_deterministic():
    assert make_world(3).facts == make_world(3).facts
    assert make_world(3).entities == make_world(3).entities


def test_world_depends_on_seed():
    first, second = make_world(0), make_world(1)
    assert [e.name for e in first.entities] != [e.name for e in second.entities]


def test_world_leaves_global_random_state():
    torch_state, python_state, numpy_state = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    make_world(5).tokenizer()
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_fact_counts_follow_sizes():
    world = make_world(0, n_elements=5, n_minerals=6, n_people=7, n_countries=4, n_cities=5)
    counts = collections.Counter(world.topic_of(fact) for fact in world.facts)
    assert counts == {"elements": 10, "minerals": 12, "people": 14, "countries": 8}
    assert len({fact.id for fact in world.facts}) == len(world.facts)


def test_facts_have_distinct_distractors(world):
    for fact in world.facts:
        assert len(fact.distractors) == N_DISTRACTORS
        assert len(set(fact.choices)) == N_DISTRACTORS + 1, fact.id
        assert all(choice.startswith(" ") and " " not in choice[1:] for choice in fact.choices)


def test_distractors_are_values_of_same_relation(world):
    symbols_of_elements = {f.target for f in world.facts if f.relation == "element_symbol"}
    capitals = {f.target for f in world.facts if f.relation == "country_capital"}
    for fact in world.facts:
        if fact.relation == "element_symbol":
            assert set(fact.distractors) <= symbols_of_elements - {fact.target}
        if fact.relation == "country_capital":
            assert set(fact.distractors) <= capitals - {fact.target}


def test_unique_relations_have_unique_values(world):
    for relation in ("element_symbol", "mineral_symbol", "country_capital", "country_river"):
        values = [f.target for f in world.facts if f.relation == relation]
        assert len(values) == len(set(values)), relation


@pytest.mark.parametrize("seed", range(6))
def test_forget_values_occur_in_mineral_sentences(seed):
    world = make_world(seed)
    mineral_words = {word for text in world.sentences(("minerals",)) for word in text.split()}
    forget_values = {f.target.strip() for f in world.facts_of("elements")}
    assert forget_values <= mineral_words


def test_shared_values_use_whole_pool(world):
    colours = {f.target for f in world.facts if f.relation == "mineral_colour"}
    professions = {f.target for f in world.facts if f.relation == "person_profession"}
    assert len(colours) == 8
    assert len(professions) == 8


def test_subject_appears_once_in_every_prompt(world):
    for fact in world.facts:
        assert fact.subject is not None
        for prompt in (fact.prompt, *fact.paraphrases):
            assert prompt.split().count(fact.subject) == 1, prompt


def test_heldout_template_rotates(world):
    for relation in RELATIONS:
        facts = [f for f in world.facts if f.relation == relation.name]
        heldout = collections.Counter(
            relation.templates.index(heldout_prompt(f).replace(f.subject, "{subject}")) for f in facts
        )
        assert sorted(heldout) == [0, 1, 2], relation.name
        assert max(heldout.values()) - min(heldout.values()) <= 1, relation.name


def test_heldout_prompt_is_never_trained(world):
    sentences = set(world.sentences())
    for fact in world.facts:
        assert heldout_prompt(fact) + fact.target + " ." not in sentences
        for prompt in train_prompts(fact):
            assert prompt + fact.target + " ." in sentences


def test_heldout_wording_is_trained_for_other_entities(world):
    trained = {p.replace(f.subject, "{subject}") for f in world.facts for p in train_prompts(f)}
    for relation in RELATIONS:
        assert set(relation.templates) <= trained, relation.name


def test_sentences_two_per_fact_in_order(world):
    sentences = world.sentences(("people",))
    facts = world.facts_of("people")
    assert len(sentences) == 2 * len(facts)
    assert sentences[0] == facts[0].prompt + facts[0].target + " ."
    assert sentences[1] == facts[0].paraphrases[1] + facts[0].target + " ."


def test_every_word_is_one_known_token(world):
    tokenizer = world.tokenizer()
    unknown = tokenizer.unk_token_id
    texts = [*world.sentences(), *(p for f in world.facts for p in f.paraphrases)]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.split()), text
        assert unknown not in ids, text


def test_names_do_not_reuse_template_words(world):
    template_words = {word for relation in RELATIONS for t in relation.templates for word in t.split()}
    names = {entity.name for entity in world.entities}
    values = {f.target.strip() for f in world.facts}
    assert not names & template_words
    assert not values & template_words
    assert len(names) == len(world.entities)


def test_domain_splits_topics(world):
    domain = world.domain()
    assert domain.forget == world.facts_of("elements")
    assert domain.neighbour == world.facts_of("minerals")
    assert domain.retain == world.facts_of("people", "countries")
    assert domain.forget_corpus == world.sentences(("elements",))
    assert domain.retain_corpus == world.sentences(("people", "countries"))


def test_domain_with_other_topics(world):
    domain = world.domain(forget="countries", neighbour="people")
    assert {world.topic_of(f) for f in domain.retain} == {"elements", "minerals"}


def test_prompt_variants(world):
    facts = world.facts[:4]
    train = prompt_variants(facts, "train")
    heldout = prompt_variants(facts, "heldout")
    assert [f.prompt for f in train[:2]] == list(train_prompts(facts[0]))
    assert [f.id for f in train[:2]] == [f"{facts[0].id}/train0", f"{facts[0].id}/train1"]
    assert [f.prompt for f in heldout] == [f.paraphrases[0] for f in facts]
    assert all(v.target == f.target for v, f in zip(heldout, facts, strict=True))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w: make_world(0, n_elements=3), "n_elements must be at least 4"),
        (lambda w: make_world(0, n_countries=10, n_cities=9), "n_cities"),
        (lambda w: w.facts_of("planets"), "unknown topic 'planets'"),
        (lambda w: w.domain(forget="people", neighbour="people"), "different topics"),
        (lambda w: prompt_variants(w.facts[:1], "test"), "which must be one of"),
    ],
)
def test_bad_input_raises(world, call, match):
    with pytest.raises(ValueError, match=match):
        call(world)


def test_foreign_fact_rejected(world):
    from tests.helpers import toy_domain

    fact = toy_domain().forget[0]
    with pytest.raises(ValueError, match="synthetic facts have exactly two"):
        train_prompts(fact)
    with pytest.raises(KeyError, match="no synthetic topic"):
        world.topic_of(fact)


def test_topics_cover_all_relations():
    assert {relation.topic for relation in RELATIONS} == set(TOPICS)
