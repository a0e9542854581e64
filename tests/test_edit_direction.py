"""Direction removal: exact agreement of hook and weight forms, and the direction finders."""

from __future__ import annotations

import pytest
import torch

from excise.completions import make_text_batch
from excise.edit import (
    DirectionRemoval,
    given_direction,
    hook_activations,
    load_edit,
    mean_difference_direction,
    probe_direction,
    remove_direction,
    residual_writers,
)
from tests.edit_models import MODEL_BUILDERS, REFERENCE_TEXTS, tiny_domain

TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}


def _vector(model, seed=0):
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_hook_and_weight_forms_agree(arch, scale):
    model = MODEL_BUILDERS[arch]()
    edit = remove_direction(model, _vector(model), scale=scale)
    tokens = make_text_batch(model, list(REFERENCE_TEXTS))[0]
    with edit.hooks(model):
        hooked = model(tokens)
    baked = edit.apply(model)(tokens)
    torch.testing.assert_close(baked, hooked, **TOLERANCE)
    assert (hooked - model(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_baked_stream_has_no_component(arch):
    model = MODEL_BUILDERS[arch]()
    vector = _vector(model, seed=1)
    edit = remove_direction(model, vector)
    unit = edit.direction.vector
    tokens = make_text_batch(model, list(REFERENCE_TEXTS))[0]
    _, clean = model.run_with_cache(tokens)
    _, cache = edit.apply(model).run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_post"
        assert float((clean[name] @ unit).abs().max()) > 1e-2
        assert float((cache[name] @ unit).abs().max()) < 1e-4


def test_writers_cover_every_write():
    gpt = MODEL_BUILDERS["gpt_like"]()
    llama = MODEL_BUILDERS["llama_like"]()
    assert residual_writers(gpt)[:2] == ["hook_embed", "hook_pos_embed"]
    assert len(residual_writers(gpt)) == 2 + 2 * gpt.cfg.n_layers
    # Rotary models have no learned position embedding to project.
    assert "hook_pos_embed" not in residual_writers(llama)
    assert residual_writers(llama, layers=[1], embeddings=False) == ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]


def test_partial_layers_only_change_those_weights():
    model = MODEL_BUILDERS["llama_like"]()
    baked = remove_direction(model, _vector(model), layers=[1], embeddings=False).apply(model)
    changed = {name for name, tensor in baked.state_dict().items() if not torch.equal(tensor, model.state_dict()[name])}
    assert changed == {"blocks.1.attn.W_O", "blocks.1.mlp.W_out"}  # the biases are zero in this model


def test_mean_difference_direction():
    model = MODEL_BUILDERS["gpt_like"]()
    domain = tiny_domain()
    positive = [f.prompt for f in domain.forget]
    negative = [f.prompt for f in domain.retain]
    direction = mean_difference_direction(model, "blocks.1.hook_resid_post", positive, negative)
    expected = hook_activations(model, "blocks.1.hook_resid_post", positive).mean(0) - hook_activations(
        model, "blocks.1.hook_resid_post", negative
    ).mean(0)
    torch.testing.assert_close(direction.vector, expected / expected.norm())
    assert direction.settings["difference_norm"] == pytest.approx(float(expected.norm()), rel=1e-5)


def test_hook_activations_positions():
    model = MODEL_BUILDERS["gpt_like"]()
    texts = ["the symbol of gold is", "paris"]
    last = hook_activations(model, "blocks.0.hook_resid_post", texts)
    mean = hook_activations(model, "blocks.0.hook_resid_post", texts, position="mean")
    _, cache = model.run_with_cache(make_text_batch(model, texts[:1])[0])
    torch.testing.assert_close(last[0], cache["blocks.0.hook_resid_post"][0, -1])
    torch.testing.assert_close(mean[0], cache["blocks.0.hook_resid_post"][0].mean(0))
    with pytest.raises(ValueError, match="position must be one of"):
        hook_activations(model, "blocks.0.hook_resid_post", texts, position="first")  # type: ignore[arg-type]


def test_probe_direction_separates():
    model = MODEL_BUILDERS["gpt_like"]()
    domain = tiny_domain()
    positive = [f.prompt for f in domain.forget + domain.neighbour]
    negative = [f.prompt for f in domain.retain]
    direction = probe_direction(model, "blocks.2.hook_resid_post", positive, negative)
    assert direction.settings["train_accuracy"] == 1.0
    scores_pos = hook_activations(model, "blocks.2.hook_resid_post", positive) @ direction.vector
    scores_neg = hook_activations(model, "blocks.2.hook_resid_post", negative) @ direction.vector
    assert float(scores_pos.mean()) > float(scores_neg.mean())
    assert float(direction.vector.norm()) == pytest.approx(1.0, abs=1e-6)


def test_save_load_round_trip(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    edit = remove_direction(model, given_direction(_vector(model), hook="blocks.0.hook_resid_post"), scale=-0.5)
    loaded = load_edit(edit.save(tmp_path / "direction"))
    assert isinstance(loaded, DirectionRemoval)
    assert torch.equal(loaded.direction.vector, edit.direction.vector)
    assert loaded.scale == -0.5
    assert loaded.direction.hook == "blocks.0.hook_resid_post"


def test_bad_input_rejected():
    model = MODEL_BUILDERS["gpt_like"]()
    with pytest.raises(ValueError, match="d_model=32"):
        remove_direction(model, torch.ones(7))
    with pytest.raises(ValueError, match="non-zero"):
        remove_direction(model, torch.zeros(32))
    with pytest.raises(ValueError, match="out of range"):
        remove_direction(model, _vector(model), layers=[5])
    with pytest.raises(ValueError, match="not a residual-stream write"):
        DirectionRemoval(given_direction(_vector(model)), ["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="not found"):
        hook_activations(model, "blocks.9.hook_resid_post", ["gold"])
