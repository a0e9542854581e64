import pytest
import torch

from excise.locate import activation_patching, attribution_patching, integrated_gradients, validate
from excise.locate.metric import make_fact_batch, run_metric
from excise.locate.sae import (
    SAETrainingSettings,
    SparseAutoencoder,
    collect_activations,
    feature_frequencies,
    top_contexts,
    train_sae,
)
from excise.plots.sae import plot_feature_bars
from excise.sites import Site
from tests.helpers import toy_domain, toy_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from more threads, and on a busy machine several threads per process thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HOOK = "blocks.0.hook_resid_post"
SMALL = SAETrainingSettings(
    d_sae=48, n_tokens=1500, steps=150, batch_tokens=128, validation_tokens=200, l1_coefficient=1.0
)


def _texts():
    domain = toy_domain()
    return [f.prompt + f.target for f in domain.all_facts()] * 15


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def sae(model, tmp_path_factory):
    return train_sae(model, HOOK, texts=_texts(), settings=SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


def test_splicing_keeps_the_model_output(model, sae):
    batch = make_fact_batch(model, toy_domain().all_facts())
    with torch.no_grad():
        clean = run_metric(model, batch, "target_logprob")
        with model.hooks(fwd_hooks=[(sae.hook_name, sae.splice_hook())]):
            spliced = run_metric(model, batch, "target_logprob")
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)

    # Without the error term the reconstruction alone changes the model: the check above is not trivial.
    def reconstruction_only(activation, hook):
        return sae.decode(sae.encode(activation))

    with torch.no_grad(), model.hooks(fwd_hooks=[(sae.hook_name, reconstruction_only)]):
        lossy = run_metric(model, batch, "target_logprob")
    assert float((lossy - clean).abs().max()) > 1e-3


def test_training_learns_a_sparse_reconstruction(model, sae):
    assert sae.d_sae == 48
    assert 0.0 < sae.metrics["fvu"] < 0.5
    assert 0.0 < sae.metrics["l0"] < 48
    # The reported quality holds on activations collected again, through the saved (scale-folded) weights.
    activations = collect_activations(model, HOOK, _texts(), n_tokens=1000)
    with torch.no_grad():
        reconstruction = sae.decode(sae.encode(activations))
    fvu = (activations - reconstruction).pow(2).sum() / (activations - activations.mean(0)).pow(2).sum()
    assert float(fvu) == pytest.approx(sae.metrics["fvu"], abs=0.1)


def test_cache_and_save_load_round_trip(model, sae, tmp_path):
    again = train_sae(model, HOOK, texts=_texts(), settings=SMALL, cache_dir=tmp_path / "other")
    assert again.sae_id == sae.sae_id  # same settings and texts give the same id
    sae.save(tmp_path / "saved")
    loaded = SparseAutoencoder.load(tmp_path / "saved")
    x = torch.randn(5, model.cfg.d_model)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-6, rtol=0)
    assert loaded.metrics == sae.metrics
    assert loaded.hook_name == HOOK


def test_feature_attribution_matches_measured_effects(model, sae):
    domain = toy_domain()
    attribution = attribution_patching(model, domain, kind="sae_feature", sae=sae, reference="zero")
    assert attribution.sae_id == sae.sae_id
    assert list(attribution.scores) == [HOOK]
    assert attribution.scores[HOOK].shape == (48,)
    validation = validate(attribution, model, domain, sae=sae, k=8, n_random=16)
    forget = validation.summary.set_index("set").loc["forget"]
    assert forget["pearson"] > 0.8


def test_batched_feature_patching_equals_the_loop(model, sae):
    from excise.locate import measure_sites

    facts = toy_domain().forget
    sites = [Site(HOOK, i, "sae_feature", sae.sae_id) for i in range(0, 48, 5)]
    for positions in ("all", "last"):
        batched = measure_sites(model, facts, sites, sae=sae, positions=positions, max_rows=8)
        loop = measure_sites(model, facts, sites, sae=sae, positions=positions, strategy="loop")
        torch.testing.assert_close(batched.drops, loop.drops, atol=1e-5, rtol=0)


def test_other_methods_take_features(model, sae):
    domain = toy_domain()
    measured = activation_patching(model, domain, kind="sae_feature", sae=sae, sets=["forget"])
    integrated = integrated_gradients(model, domain, kind="sae_feature", sae=sae, sets=["forget"], steps=4)
    assert measured.scores[HOOK].shape == integrated.scores[HOOK].shape == (48,)


def test_frequencies_contexts_and_plot(model, sae):
    domain = toy_domain()
    frequencies = feature_frequencies(model, sae, domain)
    forget = frequencies.set_scores["forget"][HOOK]
    assert bool(((forget >= 0) & (forget <= 1)).all())
    torch.testing.assert_close(frequencies.scores[HOOK], forget - frequencies.set_scores["retain"][HOOK])
    top = frequencies.top(1)[0].index
    contexts = top_contexts(model, sae, [top], _texts()[:30], k=3)
    assert list(contexts["rank"]) == [0, 1, 2]
    assert contexts["activation"].is_monotonic_decreasing
    assert all("[[" in context for context in contexts["context"])
    figure = plot_feature_bars(frequencies, contexts, k=4)
    assert figure.data[0].y[0] == f"F{top}"
    assert "[[" in figure.data[0].customdata[0]


def test_bad_input(model, sae):
    with pytest.raises(ValueError, match="head axis"):
        train_sae(model, "blocks.0.attn.hook_z", texts=["a"], cache=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_sae(model, HOOK, texts=["the symbol of gold is Au"], settings=SMALL, cache=False)
    with pytest.raises(ValueError, match="out of range"):
        top_contexts(model, sae, [480], ["the symbol of gold is Au"])
    with pytest.raises(ValueError, match="sae_feature"):
        plot_feature_bars(attribution_patching(model, toy_domain()))
