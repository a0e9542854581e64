import pytest
import torch

from excise.completions import completion_logprobs
from excise.edit import ablate
from excise.locate import activation_patching, measure_sites
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


def _sites(kind):
    if kind == "neuron":
        return [Site.neuron(layer, i) for layer in range(2) for i in range(0, 64, 13)]
    if kind == "head":
        return [Site.head(layer, h) for layer in range(2) for h in (0, 3)]
    return [Site(f"blocks.{layer}.hook_resid_pre", p, "residual") for layer in range(2) for p in (0, 3, 5)]


@pytest.mark.parametrize("kind", ["neuron", "head", "residual"])
@pytest.mark.parametrize("reference", ["zero", "mean", "resample"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_batched_equals_one_forward_pass_per_site(model, kind, reference, positions):
    facts = toy_domain().forget
    sites = _sites(kind)
    settings = dict(reference=reference, positions=positions, batch_size=4)
    batched = measure_sites(model, facts, sites, max_rows=12, **settings)
    loop = measure_sites(model, facts, sites, strategy="loop", **settings)
    torch.testing.assert_close(batched.drops, loop.drops, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.baseline, loop.baseline, atol=1e-5, rtol=0)
    assert batched.drops.abs().max() > 1e-3  # the sites do something, so equality is not trivial


def test_rows_per_pass_does_not_change_results(model):
    facts = toy_domain().retain
    sites = _sites("neuron")
    few = measure_sites(model, facts, sites, max_rows=1)
    many = measure_sites(model, facts, sites, max_rows=10_000)
    torch.testing.assert_close(few.drops, many.drops, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", ["zero", "mean"])
def test_matches_ablation_edit(model, value):
    # An independent path: the edit module's hooks and the plain completion log-probability.
    domain = toy_domain()
    facts = domain.forget
    texts = [f.prompt + f.target for f in facts]
    sites = [Site.neuron(0, 3), Site.neuron(1, 10), Site.head(0, 1), Site.head(1, 3)]
    prompts, targets = [f.prompt for f in facts], [f.target for f in facts]
    base = completion_logprobs(model, prompts, targets)
    for site in sites:
        effects = measure_sites(model, facts, [site], reference=value, reference_texts=texts)
        with ablate(model, [site], value, reference=texts).hooks(model):
            ablated = completion_logprobs(model, prompts, targets)
        torch.testing.assert_close(effects.drops[0], base - ablated, atol=1e-5, rtol=0)


def test_attribution_scores_are_mean_drops_and_selectivity(model):
    domain = toy_domain()
    attribution = activation_patching(model, domain, kind="head")
    assert set(attribution.set_scores) == {"forget", "neighbour", "retain"}
    assert attribution.settings["ranking"] == "forget - retain"
    for hook, scores in attribution.scores.items():
        assert scores.shape == (model.cfg.n_heads,)
        expected = attribution.set_scores["forget"][hook] - attribution.set_scores["retain"][hook]
        torch.testing.assert_close(scores, expected)
    effects = measure_sites(model, domain.forget, [Site.head(1, 2)])
    torch.testing.assert_close(attribution.set_scores["forget"]["blocks.1.attn.hook_z"][2], effects.mean()[0])
    against_neighbour = attribution.selectivity("neighbour")
    torch.testing.assert_close(
        against_neighbour["blocks.0.attn.hook_z"],
        attribution.set_scores["forget"]["blocks.0.attn.hook_z"]
        - attribution.set_scores["neighbour"]["blocks.0.attn.hook_z"],
    )


def test_residual_scores_cover_every_position():
    planted = planted_model("neuron", layer=0)
    attribution = activation_patching(planted.model, planted.domain, kind="residual", sets=["forget", "retain"])
    widths = {values.numel() for values in attribution.scores.values()}
    assert widths == {3}  # "recall subjectN answerN"
    # Layer 0's planted neurons write the target at the last prompt position (1), so zeroing the residual stream
    # there after layer 0 removes it. Zeroing the target's own position (2) changes nothing that predicts it.
    forget = attribution.set_scores["forget"]["blocks.1.hook_resid_pre"]
    assert forget[1] > 1.0
    assert abs(float(forget[2])) < 1e-6


@pytest.mark.parametrize("n_key_value_heads", [None, 2])
def test_finds_planted_heads(n_key_value_heads):
    planted = planted_model("head", n_key_value_heads=n_key_value_heads)
    attribution = activation_patching(planted.model, planted.domain, kind="head")
    assert attribution.top(1) == planted.sites_of("forget")
    assert attribution.top(1, largest=False) == planted.sites_of("retain")


@pytest.mark.parametrize("reference", ["zero", "mean", "resample"])
def test_finds_planted_neurons(reference):
    planted = planted_model("neuron", layer=1)
    attribution = activation_patching(planted.model, planted.domain, kind="neuron", reference=reference)
    assert set(attribution.top(4)) == set(planted.sites_of("forget"))
    assert set(attribution.top(4, largest=False)) == set(planted.sites_of("retain"))


def test_model_unchanged(model):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    activation_patching(model, toy_domain(), kind="head", reference="resample")
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, before[name], atol=0, rtol=0)
        assert parameter.grad is None
    assert not any(hook.fwd_hooks for hook in model.hook_dict.values())


def test_bad_input(model):
    facts = toy_domain().forget
    with pytest.raises(ValueError, match="one kind"):
        measure_sites(model, facts, [Site.neuron(0, 1), Site.head(0, 1)])
    with pytest.raises(ValueError, match="strategy"):
        measure_sites(model, facts, [Site.neuron(0, 1)], strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference"):
        measure_sites(model, facts, [Site.neuron(0, 1)], reference="noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric"):
        measure_sites(model, facts, [Site.neuron(0, 1)], metric="accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 facts"):
        measure_sites(model, facts[:1], [Site.neuron(0, 1)], reference="resample")
    with pytest.raises(ValueError, match="not found"):
        measure_sites(model, facts, [Site("blocks.9.mlp.hook_post", 1, "neuron")])
    with pytest.raises(ValueError, match="needs an SAE"):
        activation_patching(model, toy_domain(), kind="sae_feature")


@pytest.mark.parametrize("positions", ["all", "last"])
def test_mixed_prompt_and_target_lengths(model, positions):
    # Targets of one and two tokens and prompts of several lengths in one batch: the suffix pass of "last" must
    # start at the earliest last prompt token and read every target token.
    import dataclasses

    domain = toy_domain()
    facts = [*domain.forget[:3], *domain.retain[:3]]
    facts[1] = dataclasses.replace(facts[1], target=" Ag Fe")
    facts[4] = dataclasses.replace(facts[4], prompt="capital " + facts[4].prompt)  # longest prompt, one-token target
    facts[5] = dataclasses.replace(facts[5], target=" Rome Madrid")
    sites = _sites("neuron")
    batched = measure_sites(model, facts, sites, positions=positions, batch_size=6, max_rows=24)
    loop = measure_sites(model, facts, sites, positions=positions, batch_size=6, strategy="loop")
    torch.testing.assert_close(batched.drops, loop.drops, atol=1e-5, rtol=0)
