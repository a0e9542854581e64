"""SAE feature edits: the error term is kept, operations act as documented, and the weight form's error is measured."""

from __future__ import annotations

import pytest
import torch

from excise.completions import make_text_batch
from excise.edit import SAEFeatureEdit, load_edit, sae_feature_edit, weight_form_error
from tests.edit_models import MODEL_BUILDERS, REFERENCE_TEXTS, tiny_sae

HOOK = "blocks.1.hook_resid_pre"


def _setup(arch="llama_like", architecture="standard"):
    model = MODEL_BUILDERS[arch]()
    sae = tiny_sae(model, HOOK, architecture=architecture)
    tokens = make_text_batch(model, list(REFERENCE_TEXTS))[0]
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    x = cache[HOOK]
    acts = sae.encode(x).detach()
    firing = (acts > 0).float().mean((0, 1))
    features = firing.argsort(descending=True)[:2].tolist()  # the two most active features
    return model, sae, tokens, x, acts, features


def _edited_input(model, edit, tokens):
    with edit.hooks(model):
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK]


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_zero_keeps_error_term(architecture):
    model, sae, tokens, x, acts, features = _setup(architecture=architecture)
    assert float(acts[..., features].gt(0).float().mean()) > 0.05, "the chosen features must fire"
    edit = sae_feature_edit(model, sae, features, "zero")
    edited = _edited_input(model, edit, tokens)

    # Reference computed with sae-lens itself: decode(modified acts) + (x - decode(acts)).
    modified = acts.clone()
    modified[..., features] = 0.0
    expected = sae.decode(modified) + (x - sae.decode(acts))
    torch.testing.assert_close(edited, expected.detach(), atol=1e-5, rtol=1e-5)
    assert float((edited - x).abs().max()) > 1e-3


def test_untouched_features_change_nothing():
    model, sae, tokens, x, _, _ = _setup()
    silent = 5
    with torch.no_grad():
        sae.b_enc[silent] = -100.0
    assert float(sae.encode(x)[..., silent].max()) == 0.0
    edit = sae_feature_edit(model, sae, [silent], "scale", value=-3.0)
    torch.testing.assert_close(_edited_input(model, edit, tokens), x, rtol=0, atol=0)


def test_scale_and_clamp():
    model, sae, tokens, x, acts, features = _setup()
    scaled = _edited_input(model, sae_feature_edit(model, sae, features, "scale", value=-2.0), tokens)
    new = acts.clone()
    new[..., features] *= -2.0
    torch.testing.assert_close(scaled, x + (new - acts) @ sae.W_dec.detach(), atol=1e-5, rtol=1e-5)

    edit = sae_feature_edit(model, sae, features, "clamp", value=-4.0, threshold=0.1)
    clamped = _edited_input(model, edit, tokens)
    new = acts.clone()
    chosen = new[..., features]
    new[..., features] = torch.where(chosen > 0.1, torch.full_like(chosen, -4.0), chosen)
    torch.testing.assert_close(clamped, x + (new - acts) @ sae.W_dec.detach(), atol=1e-5, rtol=1e-5)
    # Conditional: tokens where no chosen feature exceeds the threshold are unchanged.
    quiet = (acts[..., features] <= 0.1).all(-1)
    assert bool(quiet.any())
    torch.testing.assert_close(clamped[quiet], x[quiet], rtol=0, atol=0)


def test_hook_z_sae():
    model = MODEL_BUILDERS["llama_like"]()
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    hook = "blocks.1.attn.hook_z"
    width = model.cfg.n_heads * model.cfg.d_head
    sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=8, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(width, 8, generator=torch.Generator().manual_seed(1)))
    edit = sae_feature_edit(model, sae, [0, 3], "zero")
    tokens = make_text_batch(model, list(REFERENCE_TEXTS[:2]))[0]
    _, clean = model.run_with_cache(tokens, names_filter=hook)
    with edit.hooks(model):
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    flat = clean[hook].flatten(2)
    acts = sae.encode(flat).detach()
    new = acts.clone()
    new[..., [0, 3]] = 0
    expected = flat + (new - acts) @ sae.W_dec.detach()
    torch.testing.assert_close(cache[hook].flatten(2), expected, atol=1e-5, rtol=1e-5)


def test_no_exact_weight_form():
    model, sae, _, _, _, features = _setup()
    edit = sae_feature_edit(model, sae, features, "zero")
    assert not edit.supports_weights
    with pytest.raises(TypeError, match="weight_form"):
        edit.apply(model)
    clamp = sae_feature_edit(model, sae, features, "clamp", value=-1.0)
    with pytest.raises(TypeError, match="no weight change"):
        clamp.weight_form(model)


def test_weight_form_error_reported():
    model, sae, tokens, _, _, features = _setup()
    edit = sae_feature_edit(model, sae, features[:1], "zero")
    error = weight_form_error(model, edit, list(REFERENCE_TEXTS))
    assert 0.0 < error.change_relative_error < 10.0
    assert error.logit_kl >= 0.0
    assert 0.0 <= error.top1_agreement <= 1.0

    # The weight form removes the whole decoder direction at the hook.
    baked = edit.weight_form(model).apply(model)
    _, cache = baked.run_with_cache(tokens, names_filter=HOOK)
    unit = sae.W_dec[features[0]].detach() / sae.W_dec[features[0]].detach().norm()
    assert float((cache[HOOK] @ unit).abs().max()) < 1e-4

    # With an SAE whose feature is exactly the only thing along its direction, the weight form is exact.
    assert error.activation_relative_error >= 0.0


def test_save_load_round_trip(tmp_path):
    model, sae, tokens, _, _, features = _setup(architecture="jumprelu")
    edit = sae_feature_edit(model, sae, features, "clamp", value=-2.5, threshold=0.05, sae_id="tiny")
    loaded = load_edit(edit.save(tmp_path / "sae"))
    assert isinstance(loaded, SAEFeatureEdit)
    assert loaded.features == edit.features
    assert loaded.parts.thresholds is not None
    torch.testing.assert_close(_edited_input(model, loaded, tokens), _edited_input(model, edit, tokens), rtol=0, atol=0)


def test_bad_input_rejected():
    model, sae, _, _, _, _ = _setup()
    with pytest.raises(ValueError, match="needs a value"):
        sae_feature_edit(model, sae, [0], "scale")
    with pytest.raises(ValueError, match="out of range"):
        sae_feature_edit(model, sae, [99], "zero")
    with pytest.raises(ValueError, match="operation must be one of"):
        sae_feature_edit(model, sae, [0], "mute")  # type: ignore[arg-type]
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    topk = TopKSAE(TopKSAEConfig(d_in=32, d_sae=8, k=2, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(TypeError, match="not supported"):
        sae_feature_edit(model, topk, [0], "zero")
    other = MODEL_BUILDERS["gpt_like"]()
    wide = tiny_sae(other, "blocks.9.hook_resid_pre")
    with pytest.raises(ValueError, match="not in the model"):
        sae_feature_edit(other, wide, [0], "zero")
