"""Unlearning baselines on a tiny trained model: each lowers the forget facts and returns a weight delta."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from excise.completions import completion_logprobs
from excise.edit import UNLEARN_DEFAULTS, UnlearnSettings, WeightDelta, load_edit, unlearn
from excise.edit.unlearning import _forget_examples, _retain_examples
from tests.edit_models import state_copy, tiny_domain, trained_model

# Tiny models need far larger steps than the defaults for the default model.
TINY = {"steps": 12, "learning_rate": 3e-3, "batch_size": 4}


def _forget_logprob(model, domain):
    return float(
        completion_logprobs(model, [f.prompt for f in domain.forget], [f.target for f in domain.forget]).mean()
    )


def _retain_logprob(model, domain):
    return float(
        completion_logprobs(model, [f.prompt for f in domain.retain], [f.target for f in domain.retain]).mean()
    )


@pytest.mark.parametrize("method", ["gradient_ascent", "gradient_difference", "npo", "rmu"])
def test_method_forgets(method):
    model = trained_model("llama_like")
    domain = tiny_domain()
    before = state_copy(model)
    settings = dataclasses.replace(UNLEARN_DEFAULTS[method], **TINY)
    if method == "rmu":
        settings = dataclasses.replace(settings, steering_layer=1, learning_rate=1e-2)
    edit = unlearn(model, domain, settings)
    assert isinstance(edit, WeightDelta)
    assert edit.method == method
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{method} changed the caller's {name}"
    edited = edit.apply(model)
    assert _forget_logprob(edited, domain) < _forget_logprob(model, domain) - 0.5
    assert len(edit.info["history"]) == settings.steps


def test_retain_loss_protects_retain_facts():
    model = trained_model("llama_like")
    domain = tiny_domain()
    domain = dataclasses.replace(domain, retain_corpus=())  # train the retain loss on the retain facts
    ascent = unlearn(model, domain, dataclasses.replace(UNLEARN_DEFAULTS["gradient_ascent"], **TINY)).apply(model)
    difference = unlearn(
        model, domain, dataclasses.replace(UNLEARN_DEFAULTS["gradient_difference"], **TINY, retain_weight=2.0)
    ).apply(model)
    assert _retain_logprob(difference, domain) > _retain_logprob(ascent, domain)


def test_trained_parameters():
    model = trained_model("llama_like")
    rmu = unlearn(model, tiny_domain(), dataclasses.replace(UNLEARN_DEFAULTS["rmu"], steps=1, steering_layer=2))
    assert rmu.parameter_names == ["blocks.0.mlp.W_out", "blocks.1.mlp.W_out", "blocks.2.mlp.W_out"]
    ga = unlearn(model, tiny_domain(), UnlearnSettings("gradient_ascent", steps=1, layers=(1,)))
    assert ga.parameter_names == ["blocks.1.mlp.W_in", "blocks.1.mlp.W_gate", "blocks.1.mlp.W_out"]
    assert set(ga.describe()["layer"]) == {1}


def test_examples():
    domain = tiny_domain()
    facts_only = _forget_examples(domain, UnlearnSettings("npo"))
    assert facts_only == [(f.prompt, f.target) for f in domain.forget]
    both = _forget_examples(domain, UnlearnSettings("rmu", forget_data="both", max_words=4))
    assert both[-1] == ("water", " is H2O and")
    # The retain corpus is preferred, so retain facts stay unseen by training.
    assert _retain_examples(domain, UnlearnSettings("npo"))[0][0] == "paris"


def test_save_load(tmp_path):
    model = trained_model("gpt_like")
    edit = unlearn(model, tiny_domain(), UnlearnSettings("npo", steps=2, layers=(0,)))
    loaded = load_edit(edit.save(tmp_path / "npo"))
    for name in edit.parameter_names:
        assert torch.equal(loaded.delta(name), edit.delta(name))
    assert loaded.info["settings"]["method"] == "npo"


def test_settings_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        UnlearnSettings("forget_everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        UnlearnSettings("npo", steps=0)
    with pytest.raises(ValueError, match="forget_data"):
        UnlearnSettings("npo", forget_data="all")  # type: ignore[arg-type]
    model = trained_model("gpt_like")
    with pytest.raises(ValueError, match="no parameter"):
        unlearn(model, tiny_domain(), UnlearnSettings("npo", parameters=("mlp.W_gate",)))
    with pytest.raises(ValueError, match="unknown unlearning method"):
        unlearn(model, tiny_domain(), "dpo")  # type: ignore[arg-type]
