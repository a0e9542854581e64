import pytest
import torch

from excise.locate import attribution_patching, massive_activation_neurons
from excise.sites import Site
from tests.helpers import toy_domain, toy_model


@pytest.fixture(scope="module")
def model():
    return toy_model()


def _prompts():
    return [fact.prompt for fact in toy_domain().forget + toy_domain().retain]


def test_massive_neurons_first_token_boost(model):
    def boost(activation, hook):
        activation = activation.clone()
        activation[:, 0, 5] = 500.0
        return activation

    with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", boost)]):
        found = massive_activation_neurons(model, _prompts(), batch_size=4)
    assert found == [Site("blocks.1.mlp.hook_post", 5, "neuron")]


def test_massive_neurons_ignore_uniform_boost(model):
    def boost(activation, hook):
        activation = activation.clone()
        activation[:, :, 5] = 500.0
        return activation

    with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", boost)]):
        assert massive_activation_neurons(model, _prompts()) == []


def test_massive_neurons_bad_arguments(model):
    with pytest.raises(ValueError, match="texts is empty"):
        massive_activation_neurons(model, [])
    with pytest.raises(ValueError, match="ratio must be > 0"):
        massive_activation_neurons(model, _prompts(), ratio=0)


def test_cautious_ranking_penalises_both_signs(model):
    attribution = attribution_patching(model, toy_domain())
    cautious = attribution.cautious(2.0)
    for hook in attribution.scores:
        forget = attribution.set_scores["forget"][hook]
        retain = attribution.set_scores["retain"][hook]
        torch.testing.assert_close(cautious.scores[hook], forget - 2.0 * retain.abs())
    assert cautious.settings["ranking"] == "forget - 2 * |retain|"
    assert attribution.settings["ranking"] == "forget - retain"  # the original is not changed
    with pytest.raises(ValueError, match="weight must be >= 0"):
        attribution.cautious(-1.0)


def test_top_skips_excluded_sites(model):
    attribution = attribution_patching(model, toy_domain())
    best = attribution.top(3)
    top = attribution.top(3, exclude=best[:2])
    assert best[2] == top[0]
    assert not set(best[:2]) & set(top)
    assert attribution.top(3, exclude=best[:2], largest=False) == attribution.top(3, largest=False)
    with pytest.raises(ValueError, match="2 excluded"):
        attribution.top(attribution.n_sites - 1, exclude=best[:2])
