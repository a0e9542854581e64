import pytest
import torch

from excise.locate import attribution_patching, measure_sites
from excise.locate.attribution_patching import fact_attributions, gradients_and_activations
from excise.locate.metric import make_fact_batch, run_metric
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


def test_gradient_matches_finite_difference(model):
    facts = toy_domain().forget
    batch = make_fact_batch(model, facts)
    hook = "blocks.0.mlp.hook_post"
    _, gradients = gradients_and_activations(model, batch, "neuron", [hook], "target_logprob")
    epsilon = 1e-2
    for neuron in (3, 17):

        def nudge(activation, hook, neuron=neuron):
            activation = activation.clone()
            activation[:, :, neuron] += epsilon
            return activation

        with torch.no_grad():
            base = run_metric(model, batch, "target_logprob").sum()
            with model.hooks(fwd_hooks=[(hook, nudge)]):
                nudged = run_metric(model, batch, "target_logprob").sum()
        mask = (
            torch.arange(batch.width)
            < (batch.completions.prompt_lengths + batch.completions.completion_lengths)[:, None]
        )
        expected = float(gradients[hook][..., neuron][mask].sum())
        assert float((nudged - base) / epsilon) == pytest.approx(expected, rel=0.05, abs=1e-4)


@pytest.mark.parametrize("reference", ["zero", "mean", "resample"])
def test_estimates_track_measured_effects(model, reference):
    # Small heads and neurons of a random model: the linear regime, where the estimate should be close.
    facts = toy_domain().retain
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    estimate = fact_attributions(model, facts, hooks, reference=reference, batch_size=4)
    sites = [Site.neuron(layer, i) for layer in range(2) for i in range(64)]
    measured = measure_sites(model, facts, sites, reference=reference, batch_size=4).mean()
    flat = torch.cat([estimate[h] for h in hooks])
    correlation = torch.corrcoef(torch.stack([flat, measured]))[0, 1]
    assert correlation > 0.9


def test_residual_and_head_kinds_have_component_shapes(model):
    domain = toy_domain()
    heads = attribution_patching(model, domain, kind="head", reference="mean")
    assert {tuple(v.shape) for v in heads.scores.values()} == {(model.cfg.n_heads,)}
    residual = attribution_patching(model, domain, kind="residual", reference="mean")
    width = max(make_fact_batch(model, domain.facts(w)).width for w in ("forget", "retain"))
    assert {tuple(v.shape) for v in residual.scores.values()} == {(width,)}
    assert list(residual.scores) == [*[f"blocks.{i}.hook_resid_pre" for i in range(2)], "blocks.1.hook_resid_post"]


def test_all_sets_and_selectivity_ranking(model):
    attribution = attribution_patching(model, toy_domain(), sets=None, reference="resample")
    assert list(attribution.set_scores) == ["forget", "neighbour", "retain"]
    assert attribution.settings["reference"] == "resample"
    hook = "blocks.1.mlp.hook_post"
    torch.testing.assert_close(
        attribution.scores[hook], attribution.set_scores["forget"][hook] - attribution.set_scores["retain"][hook]
    )


@pytest.mark.parametrize("n_key_value_heads", [None, 2])
def test_finds_planted_query_head(n_key_value_heads):
    planted = planted_model("head", n_key_value_heads=n_key_value_heads, head=3)
    for reference in ("zero", "mean", "resample"):
        attribution = attribution_patching(planted.model, planted.domain, kind="head", reference=reference)
        assert attribution.top(1) == [Site.head(0, 3)]
        assert attribution.top(1, largest=False) == [Site.head(0, 2)]


def test_finds_planted_neurons():
    planted = planted_model("neuron")
    attribution = attribution_patching(planted.model, planted.domain, reference="mean")
    assert set(attribution.top(4)) == set(planted.sites_of("forget"))
    assert set(attribution.top(4, largest=False)) == set(planted.sites_of("retain"))


def test_saturation_makes_the_linear_estimate_understate_planted_sites():
    # The documented weakness: with the target near certain, the gradient at the clean point is small, while
    # removing the site removes the fact.
    planted = planted_model("neuron", strength=4.0)
    attribution = attribution_patching(planted.model, planted.domain, sets=["retain"])
    sites = planted.sites_of("retain")
    measured = measure_sites(planted.model, planted.domain.retain, sites).mean()
    estimated = torch.tensor([float(attribution.set_scores["retain"][s.hook][s.index]) for s in sites])
    assert bool((measured > 0.4).all())
    assert bool((estimated < 0.05 * measured).all())


def test_bad_kind_and_hooks(model):
    with pytest.raises(ValueError, match="kind"):
        attribution_patching(model, toy_domain(), kind="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hook_post"):
        attribution_patching(model, toy_domain(), kind="neuron", hooks=["blocks.0.attn.hook_z"])
    with pytest.raises(ValueError, match="cannot tell"):
        fact_attributions(model, toy_domain().forget, ["blocks.0.hook_attn_out"])


@pytest.mark.parametrize("reference", ["zero", "mean", "resample"])
def test_multi_kind_pass_equals_separate_runs(model, reference):
    from excise.locate import attribution_patching_multi

    domain = toy_domain()
    together = attribution_patching_multi(model, domain, kinds=("neuron", "head", "residual"), reference=reference)
    for kind in ("neuron", "head", "residual"):
        alone = attribution_patching(model, domain, kind=kind, reference=reference)
        assert together[kind].kind == kind
        assert together[kind].settings == alone.settings
        for which in ("forget", "retain"):
            for hook, scores in alone.set_scores[which].items():
                torch.testing.assert_close(together[kind].set_scores[which][hook], scores, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        attribution_patching_multi(model, domain, kinds=("neuron", "neuron"))
