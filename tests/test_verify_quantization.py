import pytest
import torch

from excise.edit.ablation import ablate
from excise.sites import Site
from excise.verify.accuracy import score_facts
from excise.verify.quantization import quantization_attack, quantize_model, quantize_tensor
from excise.verify.suite import with_hooks
from tests.helpers import toy_model
from tests.verify_helpers import trained_domain, trained_model


def test_quantized_values_lie_on_channel_grid():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator)
    weight[:, 2] = 0.0  # an all-zero output channel
    for bits in (8, 4):
        levels = 2 ** (bits - 1) - 1
        quantized = quantize_tensor(weight, bits, input_axes=(0,))
        scale = weight.abs().amax(0, keepdim=True) / levels
        assert torch.equal(quantized[:, 2], torch.zeros(6))
        ok = scale.squeeze(0) > 0
        steps = quantized[:, ok] / scale[:, ok]
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max() <= levels + 1e-4
        assert (quantized - weight).abs().le(scale / 2 + 1e-7).all()  # round to nearest


def test_quantize_model_copies_and_changes_block_matrices_only():
    model = toy_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantized = quantize_model(model, 4)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    changed = {n for n, p in quantized.named_parameters() if not torch.equal(p, before[n])}
    assert "blocks.0.mlp.W_in" in changed and "blocks.1.attn._W_K" in changed and "blocks.0.attn.W_O" in changed
    assert not any(n.startswith(("embed", "unembed")) or "ln" in n or ".b_" in n for n in changed)
    with_embeddings = quantize_model(model, 4, include_embeddings=True)
    assert not torch.equal(with_embeddings.embed.W_E, model.embed.W_E)
    with pytest.raises(ValueError, match="bits"):
        quantize_tensor(model.embed.W_E, 1, (1,))


def test_eight_bits_keep_knowledge_and_hooks_travel():
    model = trained_model()
    facts = trained_domain().forget
    result = quantization_attack(model, facts, bits=(8, 4))
    assert result.bits == [None, 8, 4]
    assert result.accuracy[0] == result.accuracy[1] == 1.0
    torch.testing.assert_close(result.target_logprob[1], result.target_logprob[0], rtol=0, atol=0.05)
    edit = ablate(model, [Site.neuron(1, i) for i in range(128)])
    hooked = with_hooks(edit, model)
    with edit.hooks(model):
        inside = score_facts(model, facts).mean_target_logprob
    assert score_facts(quantize_model(hooked, 16), facts).mean_target_logprob == pytest.approx(inside, abs=1e-3)
