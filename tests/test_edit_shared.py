"""Behaviour every edit kind shares: the caller's model is untouched, hooks are always removed, edits compose,
describe() lists what changes, save and load are bit-exact, and an edit for another architecture is rejected."""

from __future__ import annotations

import pytest
import torch

from excise.completions import make_text_batch
from excise.edit import (
    Edit,
    EditSequence,
    RewriteRequest,
    UnlearnSettings,
    ablate,
    key_second_moment,
    load_edit,
    memit,
    remove_direction,
    rome,
    sae_feature_edit,
    unlearn,
)
from excise.sites import Site
from tests.edit_models import (
    REFERENCE_TEXTS,
    state_copy,
    subject_final_facts,
    tiny_domain,
    tiny_sae,
    trained_model,
)


def _stats(model, layers):
    return key_second_moment(model, layers, list(REFERENCE_TEXTS), use_cache=False)


def _sites():
    return [Site.neuron(0, 2), Site.head(1, 1), Site.head(2, 3)]


FACTORIES = {
    "ablation_zero": lambda m: ablate(m, _sites()),
    "ablation_mean": lambda m: ablate(m, _sites(), "mean", reference=list(REFERENCE_TEXTS)),
    "ablation_resample": lambda m: ablate(m, _sites(), "resample", reference=list(REFERENCE_TEXTS)),
    "direction": lambda m: remove_direction(m, torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(3))),
    "sae_features": lambda m: sae_feature_edit(m, tiny_sae(m), [0, 1, 2], "scale", value=-1.0),
    "rome": lambda m: rome(
        m,
        RewriteRequest(subject_final_facts()[0], " Ne"),
        1,
        second_moment=_stats(m, [1])[1],
        prefixes=("",),
        max_relative_update=20.0,
    ),
    "memit": lambda m: memit(
        m,
        [RewriteRequest(f, " Ne") for f in subject_final_facts()[:2]],
        [0, 1],
        second_moments=_stats(m, [0, 1]),
        prefixes=("",),
        covariance_weight=10.0,
        max_relative_update=20.0,
    ),
    "unlearning": lambda m: unlearn(m, tiny_domain(), UnlearnSettings("npo", steps=2, learning_rate=1e-3)),
    "sequence": lambda m: EditSequence((ablate(m, _sites()[:1]), remove_direction(m, torch.ones(m.cfg.d_model)))),
}
ARCHS = {"rome": ["llama_like", "gpt_like"], "memit": ["llama_like"], "unlearning": ["llama_like"]}
CASES = [(kind, arch) for kind in FACTORIES for arch in ARCHS.get(kind, ["llama_like", "gpt_like"])]


@pytest.fixture(params=CASES, ids=[f"{kind}-{arch}" for kind, arch in CASES])
def case(request):
    kind, arch = request.param
    model = trained_model(arch)
    edit = FACTORIES[kind](model)
    tokens = make_text_batch(model, list(REFERENCE_TEXTS[:3]))[0]
    return kind, model, edit, tokens


def _run(model: object, edit: Edit, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the edit in weight form where it has one, else as hooks."""
    if edit.supports_weights:
        return edit.apply(model)(tokens)  # type: ignore[arg-type]
    with edit.hooks(model) as hooked:  # type: ignore[arg-type]
        return hooked(tokens)


def _no_hooks_left(model) -> bool:
    return all(not hook_point.fwd_hooks and not hook_point.bwd_hooks for hook_point in model.hook_dict.values())


def test_callers_model_unchanged(case):
    kind, model, edit, tokens = case
    before = state_copy(model)
    clean = model(tokens)
    logits = _run(model, edit, tokens)
    assert (logits - clean).abs().max() > 1e-4, f"{kind} should change the logits"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{kind} changed the caller's {name}"
    assert _no_hooks_left(model)
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)


def test_inplace_changes_model(case):
    _, model, edit, tokens = case
    if not edit.supports_weights:
        with pytest.raises(TypeError, match="hooks"):
            edit.apply(model, inplace=True)
        return
    expected = edit.apply(model)(tokens)
    returned = edit.apply(model, inplace=True)
    assert returned is model
    torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)


def test_hooks_removed_after_exception(case):
    _, model, edit, tokens = case
    clean = model(tokens)
    if not edit.supports_hooks:
        with pytest.raises(TypeError, match="weight form"), edit.hooks(model):
            pass
    else:
        with pytest.raises(RuntimeError, match="inside the block"), edit.hooks(model):
            model(tokens)
            raise RuntimeError("failure inside the block")
    assert _no_hooks_left(model)
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)


def test_edits_compose(case):
    _, model, edit, tokens = case
    other = ablate(model, [Site.neuron(2, 5), Site.head(0, 0)], "mean", reference=list(REFERENCE_TEXTS))
    chained = edit.then(other)
    assert isinstance(chained, EditSequence)
    if edit.supports_weights:
        expected = other.apply(edit.apply(model))(tokens)
        torch.testing.assert_close(chained.apply(model)(tokens), expected, atol=1e-5, rtol=1e-5)
    else:
        with edit.hooks(model), other.hooks(model):
            expected = model(tokens)
        with chained.hooks(model):
            torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(TypeError, match="step 0"):
            chained.apply(model)


def test_describe_lists_changes(case):
    kind, model, edit, _ = case
    table = edit.describe()
    assert len(table) > 0
    assert "layer" in table.columns
    if edit.supports_weights:
        changed = {
            name
            for name, tensor in edit.apply(model).state_dict().items()
            if not torch.equal(tensor, model.state_dict()[name])
        }
        assert changed
        described_layers = set(table["layer"].dropna().astype(int))
        for name in changed:
            if name.startswith("blocks."):
                assert int(name.split(".")[1]) in described_layers, f"{kind}: change of {name} is not described"


def test_save_load_bit_exact(case, tmp_path):
    kind, model, edit, tokens = case
    loaded = load_edit(edit.save(tmp_path / kind))
    assert type(loaded) is type(edit)
    assert loaded.signature == edit.signature
    config, tensors = edit.to_parts()
    loaded_config, loaded_tensors = loaded.to_parts()
    assert loaded_config == config
    assert sorted(loaded_tensors) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded_tensors[name], tensor.detach().cpu()), f"{kind}: tensor {name} changed"
    torch.testing.assert_close(_run(model, loaded, tokens), _run(model, edit, tokens), rtol=0, atol=0)


def test_other_architecture_rejected(case, tmp_path):
    kind, model, edit, _ = case
    loaded = load_edit(edit.save(tmp_path / kind))
    config = model.cfg.to_dict()
    config["d_mlp"] = model.cfg.d_mlp * 2
    wider = type(model)(model.cfg.__class__(**config))
    with pytest.raises(ValueError, match=r"does not fit .*d_mlp: edit \d+ vs model \d+"):
        if loaded.supports_weights:
            loaded.apply(wider)
        else:
            with loaded.hooks(wider):
                pass
    assert _no_hooks_left(wider)
