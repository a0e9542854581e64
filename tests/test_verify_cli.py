import argparse
import dataclasses
import json

import pytest

from excise.data.jsonl import save_domain_file
from excise.edit.ablation import ablate
from excise.sites import Site
from excise.verify import cli
from excise.verify.relearn import RelearnSettings
from excise.verify.suite import RelearnAttack, budget_settings
from tests.verify_helpers import trained_domain, trained_model, trained_twin


def _tiny_budget(budget, seed):
    lora = RelearnSettings(steps=2, lr=1e-3, eval_every=1, method="lora", seed=seed)
    return dataclasses.replace(
        budget_settings(budget, seed),
        relearn=(RelearnAttack("relearn_lora_facts", "facts", lora),),
        in_context_ks=(0, 1),
        probe=dataclasses.replace(budget_settings(budget, seed).probe, steps=20),
    )


def test_verify_command_writes_report_folder(tmp_path, monkeypatch, capsys):
    original = trained_model()
    edit = ablate(original, [Site.neuron(1, i) for i in range(0, 128, 2)])
    edit.save(tmp_path / "edit")
    save_domain_file(trained_domain(), tmp_path / "made-up.jsonl")
    models = {"tiny": original, "tiny-twin": trained_twin()}
    monkeypatch.setattr(cli, "load_model", lambda name: models[name])
    monkeypatch.setattr("excise.verify.suite.budget_settings", _tiny_budget)

    parser = argparse.ArgumentParser()
    cli.add_verify_arguments(parser)
    args = parser.parse_args(
        [
            "--edit",
            str(tmp_path / "edit"),
            "--model",
            "tiny",
            "--twin",
            "tiny-twin",
            "--domain",
            str(tmp_path / "made-up.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--form",
            "hooks",
            "--max-facts",
            "16",
        ]
    )
    assert cli.verify_command(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["edit"]["form"] == "hooks" and report["edit"]["kind"] == "ablation"
    assert set(report["attacks"]["probe"]["results"]) == {"edited", "original", "twin"}
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "attacks.csv").is_file()
    assert "worst-case recovery" in capsys.readouterr().out

    with pytest.raises(FileExistsError):
        cli.verify_command(args)  # the report folder now exists and is not empty
