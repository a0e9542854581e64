import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from excise.locate import attribution_patching, validate
from excise.locate.planted import planted_model
from excise.plots.attribution import (
    plot_head_grid,
    plot_layer_totals,
    plot_neuron_map,
    plot_score_map,
    plot_selectivity,
    plot_top_sites,
    plot_validation,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from more threads, and on a busy machine several threads per process thrash.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    return planted_model("head", n_key_value_heads=2)


@pytest.fixture(scope="module")
def heads(planted):
    return attribution_patching(planted.model, planted.domain, kind="head")


@pytest.fixture(scope="module")
def neurons(planted):
    return attribution_patching(planted.model, planted.domain, kind="neuron")


def test_layer_totals_match_attribution(heads):
    figure = heads.plot()
    assert isinstance(figure, go.Figure)
    np.testing.assert_allclose(figure.data[0].y, heads.layer_totals().to_numpy(), rtol=1e-6)
    absolute = plot_layer_totals(heads, "forget", absolute=True)
    np.testing.assert_allclose(absolute.data[0].y, heads.layer_totals("forget", absolute=True).to_numpy(), rtol=1e-6)


def test_neuron_map_cells_are_scores(neurons):
    figure = plot_neuron_map(neurons, "forget")
    grid = np.asarray(figure.data[0].z)
    assert grid.shape == (2, 256)  # layers x d_mlp
    np.testing.assert_allclose(grid[1], neurons.set_scores["forget"]["blocks.1.mlp.hook_post"].numpy(), rtol=1e-6)
    assert "retain" in figure.data[0].hovertemplate


def test_head_grid_names_key_value_groups(heads):
    figure = plot_head_grid(heads, n_key_value_heads=2)
    assert list(figure.data[0].x) == [f"query head {h} (key/value head {h // 2})" for h in range(4)]
    grid = np.asarray(figure.data[0].z)
    assert np.unravel_index(np.nanargmax(grid), grid.shape) == (0, 3)  # the planted head


def test_plots_reject_the_wrong_kind(neurons):
    with pytest.raises(ValueError, match="head attribution"):
        plot_head_grid(neurons)


def test_selectivity_top_and_validation(planted, heads):
    selectivity = plot_selectivity(heads, top=2)
    assert list(selectivity.data[1].text) == [site.label() for site in heads.top(2)]
    top = plot_top_sites(heads, k=3)
    assert [trace.name for trace in top.data] == ["score", "forget", "retain"]
    assert list(top.data[0].y) == [site.label() for site in heads.top(3)]
    validation = validate(heads, planted.model, planted.domain, k=2, n_random=3)
    figure = plot_validation([validation])
    assert len(figure.data) == 2  # one method plus the diagonal
    np.testing.assert_allclose(
        figure.data[0].x, validation.table[validation.table["set"] == "ranking"]["actual"].to_numpy()
    )
    with pytest.raises(KeyError, match="neighbour"):
        plot_validation([validation], "neighbour")


def test_residual_score_map(planted):
    residual = attribution_patching(planted.model, planted.domain, kind="residual")
    figure = plot_score_map(residual)
    assert np.asarray(figure.data[0].z).shape == (3, 3)
