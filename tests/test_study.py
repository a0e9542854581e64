import dataclasses
import json

import pytest

from excise.data.jsonl import save_domain_file
from excise.edit import load_edit
from excise.study import StudyConfig, run_study
from excise.verify.relearn import RelearnSettings
from tests.helpers import toy_domain, toy_model


@pytest.fixture
def domain_file(tmp_path):
    path = tmp_path / "toy.jsonl"
    save_domain_file(toy_domain(), path)
    return path


def _config(domain_file, output, **overrides):
    settings = dict(
        domain=str(domain_file),
        output=output,
        k=8,
        known_only=False,
        relearn=RelearnSettings(steps=2, eval_every=1),
        sweep=(2, 8),
        suite="none",
        batch_size=8,
    )
    settings.update(overrides)
    return StudyConfig(**settings)


def test_study_writes_report_folder(tmp_path, domain_file):
    model = toy_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = run_study(_config(domain_file, tmp_path / "out"), model=model)

    folder = tmp_path / "out"
    assert {p.name for p in folder.iterdir()} == {"report.json", "report.html", "edit", "scores", "scores.csv"}
    data = json.loads((folder / "report.json").read_text())
    for state in ("before", "after"):
        for which in ("forget", "neighbour", "retain"):
            entry = data["metrics"][state][which]
            assert 0.0 <= entry["accuracy"] <= 1.0
            assert entry["n"] >= 1
    curves = data["attacks"]["relearn"]["curves"]
    assert set(curves) == {"edited", "original"}
    assert curves["edited"]["steps"] == [0, 1, 2]
    assert set(data["timings"]) >= {"load", "score_before", "locate", "edit", "verify", "relearn"}
    assert data["extra"]["sweep"]["k"] == [2, 8]
    assert report.edit["k"] == 8
    assert data["locate"]["settings"]["ranking"] == "forget - 2 * |retain|"
    assert data["locate"]["excluded"] == []  # the toy model has no massive activations
    assert "<script" in (folder / "report.html").read_text()

    edit = load_edit(folder / "edit")
    assert len(edit.describe()) == 8
    for name, tensor in model.state_dict().items():
        assert (tensor == before[name]).all(), f"{name} changed"


def test_study_rejects_nonempty_output(tmp_path, domain_file):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        run_study(_config(domain_file, output), model=toy_model())
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_study_rejects_k_too_large(tmp_path, domain_file):
    with pytest.raises(ValueError, match="k=1000 is larger"):
        run_study(_config(domain_file, tmp_path / "out", k=1000), model=toy_model())
    assert not (tmp_path / "out").exists()


def test_study_known_only_needs_known_facts(tmp_path, domain_file):
    with pytest.raises(ValueError, match="known forget facts"):
        run_study(_config(domain_file, tmp_path / "out", known_only=True), model=toy_model())
    assert not (tmp_path / "out").exists()


def test_study_config_checks():
    with pytest.raises(ValueError, match="kind"):
        StudyConfig(kind="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be >= 1"):
        StudyConfig(k=0)


def test_study_with_verify_suite(tmp_path, domain_file):
    report = run_study(_config(domain_file, tmp_path / "out", suite="quick"), model=toy_model())
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "suite" in data["timings"]
    assert data["verify"], "the suite's results are missing from report.json"
    assert "relearn" in data["attacks"]
    assert len(data["attacks"]) > 1
    assert set(report.verify) == set(data["verify"])


def test_known_record_round_trip_and_checks(tmp_path):
    from excise.data.known import load_known, record_known

    domain = toy_domain()
    path = record_known(toy_model(), domain, tmp_path / "known.json", model_name="toy")
    known = load_known(path, domain)
    assert set(known) == {fact.id for which in ("forget", "neighbour", "retain") for fact in domain.facts(which)}
    data = json.loads(path.read_text())
    assert data["model"] == "toy"
    assert data["domain"] == domain.name

    other = dataclasses.replace(domain, name="other")
    with pytest.raises(ValueError, match="records domain"):
        load_known(path, other)
    data["known"].pop(domain.forget[0].id)
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no entry for 1 facts"):
        load_known(tmp_path / "partial.json", domain)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read known-facts record"):
        load_known(tmp_path / "broken.json")


def test_study_uses_a_known_record(tmp_path, domain_file):
    from excise.data.jsonl import load_domain_file

    domain = load_domain_file(domain_file)
    # Mark all but the first forget fact as known, whatever the model ranks.
    ids = [fact.id for which in ("forget", "neighbour", "retain") for fact in domain.facts(which)]
    record = {"model": "someone else", "domain": domain.name, "known": {i: i != domain.forget[0].id for i in ids}}
    (tmp_path / "known.json").write_text(json.dumps(record))
    report = run_study(
        _config(domain_file, tmp_path / "out", known=tmp_path / "known.json", sweep=(2,)), model=toy_model()
    )
    n_eval = report.settings["n_facts"]["eval"]
    n_locate = report.settings["n_facts"]["locate"]
    assert n_eval["forget"] + n_locate["forget"] == len(domain.forget) - 1
    assert report.extra["coverage"]["forget"]["known"] == len(domain.forget) - 1

    record["domain"] = "another"
    (tmp_path / "wrong.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records domain 'another'"):
        run_study(_config(domain_file, tmp_path / "out2", known=tmp_path / "wrong.json"), model=toy_model())
    assert not (tmp_path / "out2").exists()
