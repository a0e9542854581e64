"""Export to a Hugging Face Llama checkpoint: transformers loads it and its logits match the edited model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from excise.completions import make_text_batch
from excise.edit import ablate, remove_direction
from excise.export import export_hf, llama_config
from excise.sites import Site
from tests.edit_models import MODEL_BUILDERS, REFERENCE_TEXTS, state_copy

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def _llama_with_norm_weights():
    model = MODEL_BUILDERS["llama_like"]()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # Non-trivial norm weights and b_in, so that a wrong mapping cannot pass by accident.
        for name, parameter in model.named_parameters():
            if name.endswith((".w", "b_in")):
                parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _hf_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return hf(tokens).logits, hf


def test_plain_model_round_trip(tmp_path):
    model = _llama_with_norm_weights()
    tokens = make_text_batch(model, list(REFERENCE_TEXTS))[0]
    folder = export_hf(model, tmp_path / "plain")
    logits, _ = _hf_logits(folder, tokens)
    torch.testing.assert_close(logits, model(tokens), **TOLERANCE)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] == 2
    # b_in is folded into the down projection bias, so the MLP needs biases; attention has none.
    assert config["mlp_bias"] is True
    assert config["attention_bias"] is False
    assert AutoTokenizer.from_pretrained(folder).encode("gold is Au") == model.tokenizer.encode("gold is Au")


def test_mean_ablation_sets_bias_flags(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    sites = [Site.neuron(0, 4), Site.head(1, 2), Site.head(2, 1)]
    edit = ablate(model, sites, "mean", reference=list(REFERENCE_TEXTS))
    before = state_copy(model)
    folder = export_hf(model, tmp_path / "ablated", edit=edit)
    tokens = make_text_batch(model, list(REFERENCE_TEXTS))[0]
    logits, _ = _hf_logits(folder, tokens)
    torch.testing.assert_close(logits, edit.apply(model)(tokens), **TOLERANCE)
    assert (logits - model(tokens)).abs().max() > 1e-3
    config = json.loads((folder / "config.json").read_text())
    assert config["attention_bias"] is True
    assert config["mlp_bias"] is True
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"export changed the caller's {name}"


def test_direction_removal_unties_embeddings(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    with torch.no_grad():
        model.unembed.W_U.copy_(model.embed.W_E.T)
    assert llama_config(model).tie_word_embeddings is True
    plain = export_hf(model, tmp_path / "tied")
    assert json.loads((plain / "config.json").read_text())["tie_word_embeddings"] is True
    tokens = make_text_batch(model, list(REFERENCE_TEXTS))[0]
    torch.testing.assert_close(_hf_logits(plain, tokens)[0], model(tokens), **TOLERANCE)
    edit = remove_direction(model, torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)))
    folder = export_hf(model, tmp_path / "direction", edit=edit)
    logits, _ = _hf_logits(folder, tokens)
    torch.testing.assert_close(logits, edit.apply(model)(tokens), **TOLERANCE)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False


def test_bfloat16_export(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    folder = export_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_existing_folder_kept(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    folder = export_hf(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export_hf(model, folder)
    export_hf(model, folder, overwrite=True)
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_llama_model_rejected(tmp_path):
    model = MODEL_BUILDERS["gpt_like"]()
    with pytest.raises(ValueError, match="normalization_type='LN'"):
        export_hf(model, tmp_path / "gpt")
    assert not (tmp_path / "gpt").exists()


def test_resample_edit_rejected(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    edit = ablate(model, [Site.neuron(0, 1)], "resample", reference=list(REFERENCE_TEXTS))
    with pytest.raises(TypeError, match="mean ablation for a weight form"):
        export_hf(model, tmp_path / "resampled", edit=edit)
    assert not (tmp_path / "resampled").exists()


@pytest.mark.slow
def test_default_model_export(tmp_path):
    from tests.edit_models import default_model_or_skip

    model = default_model_or_skip()
    edit = ablate(model, [Site.neuron(3, 10), Site.head(5, 4)], "mean", reference=["Water is made of hydrogen."])
    folder = export_hf(model, tmp_path / "smollm2", edit=edit)
    tokens = make_text_batch(model, ["The chemical symbol for gold is", "Paris is the capital of"])[0]
    logits, _ = _hf_logits(folder, tokens)
    edited = edit.apply(model)(tokens)
    torch.testing.assert_close(logits, edited, atol=1e-3, rtol=1e-3)
    assert os.path.getsize(folder / "model.safetensors") > 100_000_000
