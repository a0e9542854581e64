import pytest
import torch

from excise.locate import (
    SUMMARY_COLUMNS,
    activation_patching,
    attribution_patching,
    compare,
    integrated_gradients,
    validate,
)
from excise.locate.planted import planted_model
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


def test_activation_patching_validates_exactly(model):
    domain = toy_domain()
    attribution = activation_patching(model, domain, kind="head", reference="mean")
    validation = validate(attribution, model, domain, k=3, n_random=4)
    assert list(validation.summary.columns) == SUMMARY_COLUMNS
    assert set(validation.summary["set"]) == {"forget", "neighbour", "retain", "ranking"}
    assert float(validation.summary["mae"].max()) < 1e-5
    assert float(validation.summary["spearman"].min()) == pytest.approx(1.0)
    assert validation.settings["reference"] == "mean"
    assert len(validation.table) == 4 * 7
    assert (validation.table["sample"] == "top").sum() == 4 * 3


def test_ranking_row_is_selectivity(model):
    domain = toy_domain()
    attribution = attribution_patching(model, domain)
    validation = attribution.validate(model, domain, k=5, n_random=5)
    table = validation.table
    forget = table[table["set"] == "forget"]["actual"].to_numpy()
    retain = table[table["set"] == "retain"]["actual"].to_numpy()
    ranking = table[table["set"] == "ranking"]["actual"].to_numpy()
    torch.testing.assert_close(torch.tensor(ranking), torch.tensor(forget - retain))
    top_estimates = table[(table["set"] == "ranking") & (table["sample"] == "top")]["estimate"]
    assert list(top_estimates) == sorted(top_estimates, reverse=True)


def test_estimates_correlate_on_planted_model():
    planted = planted_model("neuron")
    for method in (attribution_patching, integrated_gradients):
        attribution = method(planted.model, planted.domain, reference="mean")
        validation = validate(attribution, planted.model, planted.domain, k=8, n_random=24)
        forget = validation.summary.set_index("set").loc["forget"]
        assert forget["spearman"] > 0.5, method.__name__
        assert forget["top_hit_rate"] >= 0.5, method.__name__
    table = compare([validation, validation])
    assert len(table) == 2 * len(validation.summary)


def test_bad_arguments(model):
    domain = toy_domain()
    attribution = attribution_patching(model, domain)
    with pytest.raises(ValueError, match="k and n_random"):
        validate(attribution, model, domain, k=0, n_random=0)
    with pytest.raises(KeyError, match="neighbour"):
        validate(attribution, model, domain, sets=["neighbour"])
    with pytest.raises(ValueError, match="at least one"):
        compare([])


def test_frequency_attributions_are_rejected(model):
    from excise.locate.attribution import Attribution

    frequency = Attribution(
        "sae_frequency", "activation_frequency", "neuron", {"blocks.0.mlp.hook_post": torch.ones(3)}
    )
    with pytest.raises(ValueError, match="activation_frequency"):
        validate(frequency, model, toy_domain())
