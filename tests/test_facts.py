import json

import pytest

from excise.data.facts import Domain, Fact, split_facts
from excise.data.jsonl import DomainFormatError, load_domain_file, save_domain_file
from tests.helpers import toy_domain


def _record(**fields):
    base = {"set": "forget", "id": "a", "prompt": "The symbol of gold is", "target": " Au", "distractors": [" Ag"]}
    base.update(fields)
    return json.dumps(base)


def test_domain_round_trip(tmp_path):
    domain = toy_domain()
    path = tmp_path / "toy.jsonl"
    save_domain_file(domain, path)
    loaded = load_domain_file(path)
    assert loaded == domain


def test_corpus_records_load(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [_record(), json.dumps({"set": "forget_corpus", "text": "Gold is a metal."})]
    path.write_text("\n".join(lines) + "\n\n// a comment\n")
    domain = load_domain_file(path)
    assert domain.forget_corpus == ("Gold is a metal.",)
    assert len(domain.forget) == 1


def test_every_bad_record_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        _record(),
        "{not json",
        _record(id="b", target="Au"),
        _record(id="c", set="forgotten"),
        _record(id="a"),
        _record(id="d", distractors=[]),
        _record(id="e", subject="silver"),
        _record(id="f", colour="red"),
    ]
    path.write_text("\n".join(lines))
    with pytest.raises(DomainFormatError) as caught:
        load_domain_file(path)
    problems = caught.value.problems
    assert any(":2:" in p and "invalid JSON" in p for p in problems)
    assert any(":3:" in p and "leading space" in p for p in problems)
    assert any(":4:" in p and "set" in p for p in problems)
    assert any(":5:" in p and "repeats the id on line 1" in p for p in problems)
    assert any(":6:" in p and "distractors" in p for p in problems)
    assert any(":7:" in p and "subject" in p for p in problems)
    assert any(":8:" in p and "colour" in p for p in problems)
    assert str(path) in str(caught.value)


def test_empty_domain_file_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DomainFormatError, match="no 'forget' facts"):
        load_domain_file(path)


def test_missing_domain_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_domain_file(tmp_path / "nope.jsonl")


def test_domain_requires_forget_facts():
    with pytest.raises(ValueError, match="no forget facts"):
        Domain(name="x", forget=())


def test_domain_rejects_duplicate_ids():
    fact = Fact("a", "p", " t", (" d",))
    with pytest.raises(ValueError, match="two facts with id 'a'"):
        Domain(name="x", forget=(fact,), retain=(fact,))


def test_split_facts_disjoint_and_seeded():
    facts = toy_domain().forget
    first, second = split_facts(facts, 0.5, seed=3)
    assert len(first) == 4
    assert {f.id for f in first}.isdisjoint({f.id for f in second})
    assert {f.id for f in first} | {f.id for f in second} == {f.id for f in facts}
    assert split_facts(facts, 0.5, seed=3) == (first, second)


def test_domain_subset_and_limit():
    domain = toy_domain()
    subset = domain.subset(["symbol-gold", "capital-France"])
    assert [f.id for f in subset.forget] == ["symbol-gold"]
    assert [f.id for f in subset.retain] == ["capital-France"]
    assert subset.neighbour == ()
    limited = domain.limit(n_forget=2)
    assert len(limited.forget) == 2
    assert limited.retain == domain.retain
