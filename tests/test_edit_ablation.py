"""Zero, mean and resample ablation: hook and weight forms, GQA models, save and load."""

from __future__ import annotations

import pytest
import torch

from excise.completions import make_text_batch
from excise.edit import Ablation, ablate, load_edit
from excise.sites import Site
from tests.edit_models import MODEL_BUILDERS, REFERENCE_TEXTS, state_copy

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _sites() -> list[Site]:
    # Head 1 and head 3 sit in different key/value groups of the GQA model; head 2 shares a group with head 3.
    return [Site.neuron(0, 3), Site.neuron(0, 17), Site.neuron(2, 5), Site.head(1, 1), Site.head(1, 3), Site.head(2, 2)]


def _tokens(model):
    return make_text_batch(model, list(REFERENCE_TEXTS[:3]))[0]


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("value", ["zero", "mean"])
def test_hook_and_weight_forms_agree(arch, value):
    model = MODEL_BUILDERS[arch]()
    edit = ablate(model, _sites(), value, reference=list(REFERENCE_TEXTS))
    tokens = _tokens(model)
    clean = model(tokens)
    with edit.hooks(model):
        hooked = model(tokens)
    baked = edit.apply(model)(tokens)
    torch.testing.assert_close(baked, hooked, **TOLERANCE)
    assert (hooked - clean).abs().max() > 1e-3, "the ablation should change the logits"


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_hook_form_writes_values(arch):
    model = MODEL_BUILDERS[arch]()
    edit = ablate(model, [Site.head(1, 1), Site.head(1, 3)], "mean", reference=list(REFERENCE_TEXTS))
    tokens = _tokens(model)
    with edit.hooks(model):
        _, cache = model.run_with_cache(tokens)
    expected = edit.replacements["blocks.1.attn.hook_z"]
    for row, head in enumerate((1, 3)):
        torch.testing.assert_close(cache["blocks.1.attn.hook_z"][:, :, head], expected[row].expand(*tokens.shape, -1))
    _, clean_cache = model.run_with_cache(tokens)
    # Head 2 shares its key/value head with head 3 in the GQA model but is not ablated.
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"][:, :, 2], clean_cache["blocks.1.attn.hook_z"][:, :, 2])


def test_mean_values_match_reference_mean():
    model = MODEL_BUILDERS["gpt_like"]()
    edit = ablate(model, [Site.neuron(1, 7)], "mean", reference=list(REFERENCE_TEXTS))
    tokens, lengths = make_text_batch(model, list(REFERENCE_TEXTS))
    _, cache = model.run_with_cache(tokens)
    mask = torch.arange(tokens.shape[1]) < lengths.unsqueeze(1)
    expected = cache["blocks.1.mlp.hook_post"][mask][:, 7].mean()
    torch.testing.assert_close(edit.replacements["blocks.1.mlp.hook_post"][0], expected)


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_resample_uses_reference_tokens(arch):
    model = MODEL_BUILDERS[arch]()
    edit = ablate(model, _sites(), "resample", reference=list(REFERENCE_TEXTS), seed=3)
    tokens = _tokens(model)
    with edit.hooks(model):
        logits_a, cache = model.run_with_cache(tokens)
    with edit.hooks(model):
        logits_b = model(tokens)
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
    assert (logits_a - model(tokens)).abs().max() > 1e-3

    # Every replaced neuron pair comes from one bank row: the same reference token for all sites of the hook.
    bank = edit.replacements["blocks.0.mlp.hook_post"]
    written = cache["blocks.0.mlp.hook_post"][:, :, [3, 17]].reshape(-1, 2)
    distances = (written[:, None, :] - bank[None, :, :]).abs().amax(dim=-1)
    assert float(distances.min(dim=1).values.max()) < 1e-6


def test_resample_seed_changes_draws():
    model = MODEL_BUILDERS["gpt_like"]()
    tokens = _tokens(model)
    outputs = []
    for seed in (0, 1):
        with ablate(model, _sites(), "resample", reference=list(REFERENCE_TEXTS), seed=seed).hooks(model):
            outputs.append(model(tokens))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


def test_resample_has_no_weight_form():
    model = MODEL_BUILDERS["gpt_like"]()
    before = state_copy(model)
    edit = ablate(model, _sites(), "resample", reference=list(REFERENCE_TEXTS))
    assert not edit.supports_weights
    with pytest.raises(TypeError, match=r"edit\.hooks"):
        edit.apply(model)
    with pytest.raises(TypeError, match="mean ablation"):
        edit.bake(model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_resample_bank_limit():
    model = MODEL_BUILDERS["gpt_like"]()
    edit = ablate(model, _sites(), "resample", reference=list(REFERENCE_TEXTS), max_reference_tokens=5)
    assert {bank.shape[0] for bank in edit.replacements.values()} == {5}


def test_resample_save_load(tmp_path):
    model = MODEL_BUILDERS["llama_like"]()
    edit = ablate(model, _sites(), "resample", reference=list(REFERENCE_TEXTS), seed=7)
    loaded = load_edit(edit.save(tmp_path / "edit"))
    assert isinstance(loaded, Ablation)
    assert loaded.seed == 7
    tokens = _tokens(model)
    with edit.hooks(model):
        expected = model(tokens)
    with loaded.hooks(model):
        actual = model(tokens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_ablate_rejects_bad_input():
    model = MODEL_BUILDERS["gpt_like"]()
    with pytest.raises(ValueError, match="reference texts"):
        ablate(model, _sites(), "resample")
    with pytest.raises(ValueError, match="value must be one of"):
        ablate(model, _sites(), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        ablate(model, [Site.head(0, 9)])
    with pytest.raises(ValueError, match="max_reference_tokens"):
        ablate(model, _sites(), "resample", reference=["gold"], max_reference_tokens=0)
