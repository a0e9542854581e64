import pytest

from excise.sites import Site, kv_head_of
from tests.helpers import toy_model


def test_site_layer_and_label():
    assert Site.neuron(3, 7).layer == 3
    assert Site.neuron(3, 7).label() == "L3 N7"
    assert Site.head(1, 2).label() == "L1 H2"
    assert Site("hook_embed", 0, "residual").layer is None


def test_site_validation():
    with pytest.raises(ValueError, match="kind"):
        Site("blocks.0.mlp.hook_post", 0, "neurons")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index must be >= 0"):
        Site.neuron(0, -1)
    with pytest.raises(ValueError, match="sae_id"):
        Site("blocks.0.hook_resid_post", 0, "sae_feature")


def test_site_check_against_model():
    model = toy_model()
    Site.neuron(1, 63).check(model)
    with pytest.raises(ValueError, match="out of range"):
        Site.neuron(1, 64).check(model)
    with pytest.raises(ValueError, match="not found"):
        Site.neuron(5, 0).check(model)
    with pytest.raises(ValueError, match="out of range"):
        Site.head(0, 4).check(model)


def test_grouped_query_heads_share_kv():
    model = toy_model()  # 4 query heads, 2 key/value heads
    assert [kv_head_of(model, head) for head in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="out of range"):
        kv_head_of(model, 4)
