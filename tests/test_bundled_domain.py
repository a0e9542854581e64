"""Integrity checks for the bundled chemistry domain: the ground truth of every experiment."""

from __future__ import annotations

import collections
import re
from importlib import resources

import pytest

from excise.data.bundled import bundled_domain, bundled_domain_names
from excise.data.facts import Domain, Fact
from excise.data.jsonl import load_domain_file

MINIMUM_COUNTS = {"forget": 170, "neighbour": 120, "retain": 330}
ELEMENT_WORDS = [
    "hydrogen", "helium", "lithium", "carbon", "nitrogen", "oxygen", "fluorine", "neon", "sodium", "magnesium",
    "aluminum", "silicon", "phosphorus", "sulfur", "chlorine", "argon", "potassium", "calcium", "iron", "copper",
    "zinc", "bromine", "silver", "iodine", "platinum", "gold", "mercury", "uranium",
]  # fmt: skip
CHEMISTRY_WORDS = ["chemical", "chemistry", "acid", "molecule", "atom", "periodic", "compound", "oxide", "alloy"]


@pytest.fixture(scope="module")
def domain() -> Domain:
    return bundled_domain()


def _all_prompts(fact: Fact) -> list[str]:
    return [fact.prompt, *fact.paraphrases]


def _word_in(word: str, text: str) -> bool:
    return re.search(r"\b" + re.escape(word.lower()) + r"\b", text.lower()) is not None


def test_file_loads_and_matches_loader(domain: Domain) -> None:
    path = resources.files("excise.data") / "domains" / "chemistry.jsonl"
    with resources.as_file(path) as file:
        direct = load_domain_file(file)
    assert direct == domain
    assert domain.name == "chemistry"


def test_names_and_unknown_name() -> None:
    assert "chemistry" in bundled_domain_names()
    with pytest.raises(ValueError, match=r"no bundled domain 'biologyy'.*chemistry"):
        bundled_domain("biologyy")
    with pytest.raises(TypeError, match="name"):
        bundled_domain(3)  # type: ignore[arg-type]


def test_counts_meet_minimums(domain: Domain) -> None:
    for fact_set, minimum in MINIMUM_COUNTS.items():
        assert len(domain.facts(fact_set)) >= minimum, fact_set
    assert len(domain.forget_corpus) >= 40
    assert len(domain.retain_corpus) >= 40


def test_forget_covers_promised_relations(domain: Domain) -> None:
    relations = collections.Counter(fact.relation for fact in domain.forget)
    assert relations["element_symbol"] >= 40
    assert relations["symbol_element"] >= 30
    assert relations["atomic_number"] >= 20
    assert relations["compound_formula"] >= 20
    for relation in ("reaction_product", "indicator", "ph", "element_group", "element_state", "acid_source"):
        assert relations[relation] >= 2, relation


def test_every_fact_is_well_formed(domain: Domain) -> None:
    problems = []
    for fact in domain.all_facts():
        if len(fact.distractors) < 3:
            problems.append(f"{fact.id}: fewer than 3 distractors")
        if len(fact.paraphrases) < 1:
            problems.append(f"{fact.id}: no paraphrase")
        if not fact.subject or not fact.relation:
            problems.append(f"{fact.id}: missing subject or relation")
            continue
        for prompt in _all_prompts(fact):
            if prompt != prompt.strip():
                problems.append(f"{fact.id}: prompt {prompt!r} has leading or trailing white space")
            if fact.subject not in prompt:
                problems.append(f"{fact.id}: subject {fact.subject!r} not in {prompt!r}")
        if fact.prompt.count(fact.subject) != 1:
            problems.append(f"{fact.id}: subject {fact.subject!r} is ambiguous in the prompt")
        for answer in fact.choices:
            if not answer.startswith(" ") or answer.startswith("  ") or answer != answer.rstrip():
                problems.append(f"{fact.id}: answer {answer!r} needs exactly one leading space and no trailing one")
        normalized = [answer.strip().lower() for answer in fact.choices]
        if len(set(normalized)) != len(normalized):
            problems.append(f"{fact.id}: the target or a distractor repeats (ignoring case): {fact.choices}")
        if len(set(fact.paraphrases) | {fact.prompt}) != 1 + len(fact.paraphrases):
            problems.append(f"{fact.id}: a paraphrase repeats the prompt or another paraphrase")
    assert not problems, "\n".join(problems)


def test_ids_and_prompts_are_unique(domain: Domain) -> None:
    facts = domain.all_facts()
    assert len({fact.id for fact in facts}) == len(facts)
    prompts = collections.Counter(prompt for fact in facts for prompt in _all_prompts(fact))
    repeated = [prompt for prompt, count in prompts.items() if count > 1]
    assert not repeated
    assert all(fact.id.isascii() and fact.id == fact.id.lower() and " " not in fact.id for fact in facts)


def test_no_prompt_contains_its_target(domain: Domain) -> None:
    leaks = [
        f"{fact.id}: {prompt!r}"
        for fact in domain.all_facts()
        for prompt in _all_prompts(fact)
        if _word_in(fact.target.strip(), prompt)
    ]
    assert not leaks


def test_retain_facts_do_not_mention_chemistry(domain: Domain) -> None:
    hits = [
        f"{fact.id}: {word}"
        for fact in domain.retain
        for word in ELEMENT_WORDS + CHEMISTRY_WORDS
        if any(_word_in(word, text) for text in (*_all_prompts(fact), fact.target))
    ]
    assert not hits
    corpus_hits = [word for text in domain.retain_corpus for word in CHEMISTRY_WORDS if _word_in(word, text)]
    assert not corpus_hits


def test_forget_and_kept_share_few_targets(domain: Domain) -> None:
    # A few generic targets (colors, " oxygen", " carbon dioxide") appear on both sides, so an edit that suppresses
    # these tokens everywhere shows up as damage to the kept sets. Element symbols and formulas are never kept targets,
    # except the letter " B" (boron, and the letter after A).
    forget_targets = {fact.target for fact in domain.forget}
    kept_targets = {fact.target for fact in (*domain.neighbour, *domain.retain)}
    shared = forget_targets & kept_targets
    assert len(shared) <= 8, sorted(shared)
    symbols = {fact.target for fact in domain.forget if fact.relation in ("element_symbol", "compound_formula")}
    assert symbols & {fact.target for fact in domain.neighbour} == set()
    assert symbols & {fact.target for fact in domain.retain} <= {" B"}


def test_symbol_facts_agree_both_ways(domain: Domain) -> None:
    by_id = {fact.id: fact for fact in domain.forget}
    name_to_symbol = {f.subject: f.target.strip() for f in domain.forget if f.relation == "element_symbol"}
    symbol_to_name = {f.subject: f.target.strip() for f in domain.forget if f.relation == "symbol_element"}
    assert symbol_to_name
    for symbol, name in symbol_to_name.items():
        assert name_to_symbol[name] == symbol
    assert by_id["chem-symbol-gold"].target == " Au"
    assert by_id["chem-element-fe"].target == " iron"
    assert by_id["chem-formula-water"].target == " H2O"
    # distractors of a symbol fact are symbols of other elements, never the element's own symbol
    all_symbols = set(name_to_symbol.values())
    for fact in domain.forget:
        if fact.relation == "symbol_element":
            assert all(d.strip() in name_to_symbol for d in fact.distractors), fact.id
        if fact.relation == "element_symbol":
            assert all(d.strip() != name_to_symbol[fact.subject] for d in fact.distractors), fact.id
            assert all(d.strip()[0].isupper() and len(d.strip()) <= 2 for d in fact.distractors), fact.id
    assert len(all_symbols) == len(name_to_symbol)


def test_atomic_numbers_are_correct(domain: Domain) -> None:
    known = {"hydrogen": 1, "helium": 2, "carbon": 6, "oxygen": 8, "sodium": 11, "iron": 26, "gold": 79, "uranium": 92}
    numbers = {f.subject: int(f.target) for f in domain.forget if f.relation == "atomic_number"}
    for name, number in known.items():
        assert numbers[name] == number
    for fact in domain.forget:
        if fact.relation == "atomic_number":
            assert all(int(d) > 0 and int(d) != int(fact.target) for d in fact.distractors), fact.id


def test_corpora_are_short_paragraphs(domain: Domain) -> None:
    for text in (*domain.forget_corpus, *domain.retain_corpus):
        sentences = len(re.findall(r"[.!?](?:\s|$)", text))
        assert 2 <= sentences <= 5, text
        assert text == text.strip()
    assert len(set(domain.forget_corpus)) == len(domain.forget_corpus)
    lab_words = [*ELEMENT_WORDS, *CHEMISTRY_WORDS, "acids", "reactions", "distillation"]
    off_topic = [text for text in domain.forget_corpus if not any(_word_in(word, text) for word in lab_words)]
    assert not off_topic


def test_known_record_covers_bundled_domain() -> None:
    from pathlib import Path

    import excise.data
    from excise.data.known import load_known

    domain = bundled_domain("chemistry")
    path = Path(excise.data.__file__).parent / "domains" / "chemistry.known.smollm2-135m-instruct.json"
    known = load_known(path, domain)
    assert len(known) == len(domain.forget) + len(domain.neighbour) + len(domain.retain)
    assert sum(known[fact.id] for fact in domain.forget) >= 100
