import pytest
import torch

from excise.completions import completion_logprobs
from excise.edit import ablate
from excise.locate import Attribution, attribution_patching
from excise.sites import Site
from tests.helpers import toy_domain, toy_model


@pytest.fixture(scope="module")
def model():
    return toy_model()


def _mean_logprob(model, facts):
    return float(completion_logprobs(model, [f.prompt for f in facts], [f.target for f in facts]).mean())


def test_estimates_track_single_neuron_ablation(model):
    domain = toy_domain()
    attribution = attribution_patching(model, domain)
    base = _mean_logprob(model, domain.forget)
    estimated, actual = [], []
    for site in attribution.top(6, by="forget") + attribution.top(6, by="forget", largest=False):
        with ablate(model, [site]).hooks(model):
            actual.append(base - _mean_logprob(model, domain.forget))
        estimated.append(float(attribution.set_scores["forget"][site.hook][site.index]))
    correlation = torch.corrcoef(torch.tensor([estimated, actual]))[0, 1]
    assert correlation > 0.9


def test_selectivity_is_forget_minus_retain(model):
    attribution = attribution_patching(model, toy_domain())
    for hook, scores in attribution.scores.items():
        expected = attribution.set_scores["forget"][hook] - attribution.set_scores["retain"][hook]
        torch.testing.assert_close(scores, expected)


def test_gradients_of_model_untouched(model):
    attribution_patching(model, toy_domain(), kind="head")
    assert all(parameter.grad is None for parameter in model.parameters())


def test_top_and_frame(model):
    attribution = attribution_patching(model, toy_domain())
    top = attribution.top(5)
    flat = attribution.flat_scores()
    assert [float(attribution.scores[s.hook][s.index]) for s in top] == sorted(flat.tolist(), reverse=True)[:5]
    frame = attribution.to_frame()
    assert len(frame) == 2 * 64
    assert {"forget", "retain", "score", "label"} <= set(frame.columns)
    with pytest.raises(ValueError, match="k must be between"):
        attribution.top(129)


def test_attribution_save_load(tmp_path, model):
    attribution = attribution_patching(model, toy_domain())
    attribution.save(tmp_path / "scores")
    loaded = Attribution.load(tmp_path / "scores")
    assert loaded.settings == attribution.settings
    for hook in attribution.scores:
        assert torch.equal(loaded.scores[hook], attribution.scores[hook])
        assert torch.equal(loaded.set_scores["retain"][hook], attribution.set_scores["retain"][hook])


def test_bad_options_rejected(model):
    with pytest.raises(ValueError, match="kind must be one of"):
        attribution_patching(model, toy_domain(), kind="feature")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions"):
        attribution_patching(model, toy_domain(), positions="first")  # type: ignore[arg-type]


def test_attribution_rejects_2d_scores():
    with pytest.raises(ValueError, match="1-D"):
        Attribution("m", "x", "neuron", {"blocks.0.mlp.hook_post": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="at least one hook"):
        Attribution("m", "x", "neuron", {})
    assert Site.neuron(0, 1) in Attribution("m", "x", "neuron", {"blocks.0.mlp.hook_post": torch.zeros(2)}).sites()
