import pytest
import torch

from excise.locate import attribution_patching, integrated_gradients
from excise.locate.integrated_gradients import ig_completeness
from excise.locate.planted import planted_model
from excise.sites import Site
from tests.helpers import toy_domain, toy_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from more threads, and on a busy machine several threads per process thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.mark.parametrize("kind", ["neuron", "head"])
@pytest.mark.parametrize("reference", ["zero", "mean", "resample"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_completeness_per_hook(model, kind, reference, positions):
    # The scores of one hook sum to the measured drop when the whole hook is at its reference.
    domain = toy_domain()
    attribution = integrated_gradients(
        model, domain, kind=kind, sets=["forget"], reference=reference, positions=positions, steps=32
    )
    for hook, (total, measured) in ig_completeness(attribution, model, domain).items():
        assert total == pytest.approx(measured, abs=2e-3), hook


def test_scores_converge_with_steps(model):
    domain = toy_domain()
    coarse = integrated_gradients(model, domain, sets=["forget"], steps=16)
    fine = integrated_gradients(model, domain, sets=["forget"], steps=64)
    for hook in coarse.scores:
        torch.testing.assert_close(coarse.scores[hook], fine.scores[hook], atol=2e-3, rtol=0.05)


def test_finds_saturated_planted_neurons():
    planted = planted_model("neuron", strength=4.0)
    ig = integrated_gradients(planted.model, planted.domain, steps=16)
    assert set(ig.top(4)) == set(planted.sites_of("forget"))
    assert set(ig.top(4, largest=False)) == set(planted.sites_of("retain"))
    linear = attribution_patching(planted.model, planted.domain)
    assert set(linear.top(4, largest=False)) != set(planted.sites_of("retain"))


def test_finds_planted_query_head_in_grouped_model():
    planted = planted_model("head", n_key_value_heads=2, head=3)
    attribution = integrated_gradients(planted.model, planted.domain, kind="head", steps=8, positions="last")
    assert attribution.top(1) == [Site.head(0, 3)]
    assert attribution.settings["steps"] == 8


def test_bad_steps(model):
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(model, toy_domain(), steps=0)
