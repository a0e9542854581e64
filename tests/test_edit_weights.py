"""WeightDelta: dense and low-rank deltas, their checks, and their description."""

from __future__ import annotations

import pytest
import torch

from excise.edit import WeightDelta, model_signature
from tests.edit_models import MODEL_BUILDERS


def test_dense_and_low_rank_bake():
    model = MODEL_BUILDERS["llama_like"]()
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(model.cfg.d_mlp, model.cfg.d_model, generator=generator)
    left = torch.randn(model.cfg.d_mlp, 2, generator=generator)
    right = torch.randn(2, model.cfg.d_model, generator=generator)
    edit = WeightDelta({"blocks.0.mlp.W_out": dense}, {"blocks.2.mlp.W_out": (left, right)}, method="test")
    baked = edit.apply(model)
    torch.testing.assert_close(baked.blocks[0].mlp.W_out, model.blocks[0].mlp.W_out + dense)
    torch.testing.assert_close(baked.blocks[2].mlp.W_out, model.blocks[2].mlp.W_out + left @ right)
    table = edit.describe()
    assert table["parameter"].tolist() == ["blocks.0.mlp.W_out", "blocks.2.mlp.W_out"]
    assert table["rank"].tolist()[1] == 2
    assert table["delta_norm"].tolist()[0] == pytest.approx(float(dense.norm()))
    norms = edit.relative_norms(model)
    assert norms["blocks.2.mlp.W_out"] == pytest.approx(float((left @ right).norm() / model.blocks[2].mlp.W_out.norm()))


def test_no_hook_form():
    model = MODEL_BUILDERS["gpt_like"]()
    edit = WeightDelta({"blocks.0.mlp.b_out": torch.ones(model.cfg.d_model)})
    with pytest.raises(TypeError, match="weight form"), edit.hooks(model):
        pass


def test_invalid_deltas_rejected():
    model = MODEL_BUILDERS["gpt_like"]()
    with pytest.raises(ValueError, match="at least one"):
        WeightDelta()
    with pytest.raises(ValueError, match="left"):
        WeightDelta(low_rank={"blocks.0.mlp.W_out": (torch.ones(4, 2), torch.ones(3, 5))})
    with pytest.raises(ValueError, match="both a dense and a low-rank"):
        WeightDelta({"a": torch.ones(1)}, {"a": (torch.ones(1, 1), torch.ones(1, 1))})
    missing = WeightDelta({"blocks.0.mlp.W_gate": torch.ones(32, 64)}, signature=model_signature(model))
    with pytest.raises(ValueError, match="no parameter"):
        missing.apply(model)
    wrong = WeightDelta({"blocks.0.mlp.W_out": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="has shape"):
        wrong.apply(model)
    with pytest.raises(KeyError, match="no delta"):
        wrong.delta("blocks.1.mlp.W_out")
