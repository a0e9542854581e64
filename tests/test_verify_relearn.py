import pytest
import torch

from excise.verify.accuracy import score_facts
from excise.verify.relearn import RelearnSettings, add_lora, relearn, relearn_text
from tests.helpers import toy_domain, toy_model
from tests.verify_helpers import gradient_ascent_model, trained_domain, trained_twin

LORA = RelearnSettings(steps=12, lr=3e-3, batch_size=8, eval_every=4, method="lora", lora_rank=4)


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_lora_starts_at_the_model_and_trains_only_adapters():
    model = toy_model()  # llama layout: grouped-query attention and a gated MLP
    tokens = torch.tensor([[3, 4, 5, 6]])
    before = model(tokens)
    settings = RelearnSettings(method="lora", lora_targets=("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_gate"))
    trained = add_lora(model, settings)
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=1e-6)  # B starts at zero
    cfg = model.cfg
    d_kv = cfg.n_key_value_heads * cfg.d_head
    per_block = (
        (cfg.d_model + cfg.n_heads * cfg.d_head)  # W_Q
        + 2 * (cfg.d_model + d_kv)  # W_K, W_V on the shared key/value heads
        + (cfg.n_heads * cfg.d_head + cfg.d_model)  # W_O
        + 3 * (cfg.d_model + cfg.d_mlp)  # W_in, W_out, W_gate
    ) * settings.lora_rank
    assert sum(p.numel() for p in trained) == cfg.n_layers * per_block
    assert all(p.requires_grad for p in trained)
    assert not any(
        p.requires_grad
        for name, p in model.named_parameters()
        if "parametrizations" not in name or name.endswith("original")
    )


def test_lora_relearning_keeps_caller_model_and_reports_curve():
    model = gradient_ascent_model()
    before = _state(model)
    facts = trained_domain().forget
    curve = relearn(model, facts[:8], facts[8:], LORA)
    assert curve.method == "lora" and curve.data == "facts"
    assert curve.steps == [0, 4, 8, 12]
    assert curve.accuracy[0] == score_facts(model, facts[8:]).accuracy
    assert curve.train_loss[-1] < curve.train_loss[0]
    assert 0 < curve.trained_parameters < sum(p.numel() for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_shallow_edit_relearns_faster_than_twin_learns():
    facts = trained_domain().forget
    edited = relearn(gradient_ascent_model(), facts[:8], facts[8:], LORA)
    twin = relearn(trained_twin(), facts[:8], facts[8:], LORA)
    # Training on 8 facts brings the 8 held-out ones back in the edited model, not in the twin that never knew them.
    assert max(edited.accuracy) - edited.accuracy[0] >= 0.25
    assert max(edited.accuracy) > max(twin.accuracy)


def test_text_relearning_lowers_text_loss():
    model = toy_model()
    texts = ["the symbol of gold is Au", "the capital of Peru is Lima the capital of Spain is Madrid"]
    settings = RelearnSettings(steps=10, lr=1e-2, batch_size=2, eval_every=5, method="lora", max_tokens=4)
    curve = relearn_text(model, texts, toy_domain().forget, settings)
    assert curve.data == "text"
    assert len(curve.train_loss) == 10 and curve.train_loss[-1] < curve.train_loss[0]
    full = relearn_text(model, texts, toy_domain().forget, RelearnSettings(steps=2, eval_every=1))
    assert full.method == "full" and full.trained_parameters == sum(p.numel() for p in model.parameters())


def test_text_relearning_short_context():
    # Chunks of max_tokens would overflow a context of 8 positions, so they are cut to the context.
    model = toy_model(n_ctx=8, positional_embedding_type="standard")
    texts = ["the symbol of gold is Au the capital of Peru is Lima the capital of Spain is Madrid"]
    settings = RelearnSettings(steps=2, lr=1e-3, batch_size=1, eval_every=1, max_tokens=64)
    curve = relearn_text(model, texts, toy_domain().forget[:2], settings)
    assert len(curve.train_loss) == 2


def test_settings_and_input_checks():
    with pytest.raises(ValueError, match="method"):
        RelearnSettings(method="adapter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lora_targets"):
        RelearnSettings(lora_targets=("W_X",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lora_rank"):
        RelearnSettings(lora_rank=0)
    with pytest.raises(ValueError, match="two or more tokens"):
        relearn_text(toy_model(), ["gold", "  "], toy_domain().forget)
    with pytest.raises(ValueError, match="held-out fact"):
        relearn_text(toy_model(), ["the symbol of gold is Au"], [])
