import dataclasses

import numpy as np
import pytest
import torch

from excise.locate import causal_tracing
from excise.locate.causal_tracing import CATEGORIES, subject_positions
from excise.locate.planted import planted_model
from excise.plots.causal_tracing import plot_fact_trace, plot_trace_summary
from tests.helpers import toy_domain, toy_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from more threads, and on a busy machine several threads per process thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted_neuron():
    return planted_model("neuron", layer=1, n_layers=3)


def test_planted_mlp_layer_restores_the_fact(planted_neuron):
    trace = causal_tracing(planted_neuron.model, planted_neuron.domain, n_samples=4, window=1)
    for fact in trace.traces:
        assert fact.corrupted < fact.clean - 0.2  # corruption removes the fact
        mlp = fact.grids["mlp"]
        assert tuple(mlp.shape) == (3, 2)
        # Only the planted MLP (layer 1) at the last prompt position brings the answer back.
        assert np.unravel_index(int(mlp.argmax()), mlp.shape) == (1, 1)
        assert float(mlp[1, 1]) == pytest.approx(fact.clean, abs=0.1)
        # Restoring the residual stream at the subject position of any layer restores everything after it.
        torch.testing.assert_close(fact.grids["resid"][:, 1], torch.full((3,), fact.clean), atol=1e-5, rtol=0)


def test_planted_head_shows_in_attention(planted_neuron):
    planted = planted_model("head", layer=1, n_layers=3, n_key_value_heads=2)
    trace = causal_tracing(planted.model, planted.domain, kinds=["attn"], n_samples=4, window=1)
    for fact in trace.traces:
        assert np.unravel_index(int(fact.grids["attn"].argmax()), (3, 2)) == (1, 1)


def test_window_restores_neighbouring_layers(planted_neuron):
    trace = causal_tracing(planted_neuron.model, planted_neuron.domain, kinds=["mlp"], n_samples=4, window=3)
    for fact in trace.traces:
        # With a window of 3 every layer's window contains the planted layer 1.
        assert float(fact.grids["mlp"][:, 1].min()) > fact.corrupted + 0.5 * (fact.clean - fact.corrupted)


def test_no_noise_means_nothing_to_restore(planted_neuron):
    trace = causal_tracing(planted_neuron.model, planted_neuron.domain, noise=0.0, n_samples=2, kinds=["resid"])
    for fact in trace.traces:
        assert fact.corrupted == pytest.approx(fact.clean, abs=1e-5)
        torch.testing.assert_close(
            fact.grids["resid"], torch.full_like(fact.grids["resid"], fact.clean), atol=1e-5, rtol=0
        )


def test_same_seed_same_trace(planted_neuron):
    first = causal_tracing(planted_neuron.model, planted_neuron.domain.forget[:1], n_samples=3, kinds=["mlp"])
    second = causal_tracing(planted_neuron.model, planted_neuron.domain.forget[:1], n_samples=3, kinds=["mlp"])
    torch.testing.assert_close(first.traces[0].grids["mlp"], second.traces[0].grids["mlp"], atol=0, rtol=0)


def test_categories_and_subject_positions():
    model = toy_model()
    fact = toy_domain().forget[0]  # "the symbol of gold is"
    assert subject_positions(model, fact) == (3,)
    trace = causal_tracing(model, [fact], n_samples=2, kinds=["resid", "mlp"])
    assert trace.traces[0].categories() == [
        "before subject",
        "before subject",
        "before subject",
        CATEGORIES[0],
        CATEGORIES[5],
    ]
    summary = trace.by_category("mlp")
    assert tuple(summary.shape) == (2, len(CATEGORIES))
    assert torch.isnan(summary[:, 1]).all()  # one-token subject: no middle tokens
    frame = trace.to_frame()
    assert list(frame["fact_id"]) == [fact.id]


def test_plots(planted_neuron):
    trace = causal_tracing(planted_neuron.model, planted_neuron.domain, n_samples=2)
    figure = plot_fact_trace(trace, 0)
    assert len(figure.data) == 3
    np.testing.assert_allclose(figure.data[1].z, trace.traces[0].grids["mlp"].numpy().T)
    assert figure.data[0].y[1].endswith("*")  # the subject token is marked
    summary = plot_trace_summary(trace)
    assert len(summary.data) == 3
    with pytest.raises(IndexError):
        plot_fact_trace(trace, 9)


def test_bad_input():
    model = toy_model()
    fact = toy_domain().forget[0]
    with pytest.raises(ValueError, match="no subject"):
        causal_tracing(model, [dataclasses.replace(fact, subject=None)])
    with pytest.raises(ValueError, match="does not occur"):
        causal_tracing(model, [dataclasses.replace(fact, subject="platinum")])
    with pytest.raises(ValueError, match="kinds"):
        causal_tracing(model, [fact], kinds=["embed"])  # type: ignore[list-item]
