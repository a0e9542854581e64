import numpy as np
import pytest
import torch

from excise.completions import (
    choice_logprobs,
    completion_logprobs,
    make_batch,
    make_text_batch,
    only_position_wise_hooks,
    position_wise,
    tokenize_completion,
    tokenize_prompt,
)
from tests.helpers import toy_model


@pytest.fixture(scope="module")
def model():
    return toy_model()


def test_right_padding_keeps_logits(model):
    prompts = ["the symbol of gold is", "the capital of France is"]
    targets = [" Au", " Paris"]
    batch = make_batch(model, prompts, targets)
    batched = model(batch.tokens)
    for row in range(2):
        alone = make_batch(model, [prompts[row]], [targets[row]])
        length = int(alone.tokens.shape[1])
        torch.testing.assert_close(batched[row, :length], model(alone.tokens)[0], atol=1e-5, rtol=0)


def test_completion_logprob_matches_manual(model):
    batch = make_batch(model, ["the symbol of gold is"], [" Au"])
    logits = model(batch.tokens)
    manual = logits[0, -2].log_softmax(-1)[batch.tokens[0, -1]]
    torch.testing.assert_close(batch.completion_logprobs(logits)[0], manual, atol=1e-6, rtol=0)


def test_completion_mask_positions(model):
    batch = make_batch(model, ["the symbol of gold is", "the capital of France is"], [" Au", " Paris"])
    mask = batch.completion_mask
    assert mask.sum(1).tolist() == [1.0, 1.0]
    assert mask[0].nonzero().item() == batch.prompt_lengths[0].item() - 1


def test_batched_logprobs_independent_of_batch_size(model):
    prompts = ["the symbol of gold is", "the capital of France is", "the colour of sky is"]
    targets = [" Au", " Paris", " blue"]
    torch.testing.assert_close(
        completion_logprobs(model, prompts, targets, batch_size=1),
        completion_logprobs(model, prompts, targets, batch_size=3),
        atol=1e-5,
        rtol=0,
    )


def test_bad_batches_rejected(model):
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        make_batch(model, ["a", "b"], [" c"])
    with pytest.raises(ValueError, match="zero prompts"):
        make_batch(model, [], [])
    with pytest.raises(ValueError, match="no tokens"):
        make_batch(model, ["the symbol of gold is"], [" "])
    with pytest.raises(ValueError, match="longer than the model's context"):
        make_batch(model, ["gold " * 100], [" Au"])


def test_text_batch_lengths(model):
    tokens, lengths = make_text_batch(model, ["the symbol of gold is Au", "gold"])
    assert lengths.tolist() == [6, 1]
    assert tokens.shape == (2, 6)


def test_score_matches_full_logits(model):
    prompts = ["the symbol of gold is", "the capital of France is", "the colour of sky is"]
    targets = [" Au Au", " Paris", " blue Au Paris"]
    batch = make_batch(model, prompts, targets)
    expected = batch.completion_logprobs(model(batch.tokens))
    torch.testing.assert_close(batch.score(model), expected, atol=1e-5, rtol=0)
    first = batch.completion_logits(model)[:, 0]
    torch.testing.assert_close(first, batch.first_token_logits(model(batch.tokens)), atol=1e-5, rtol=0)


PROMPTS = [
    "the symbol of gold is",
    "the symbol of iron is",
    "the symbol of silver is",
    "the capital of France is",
    "the colour of grass is",
]
CHOICES = [
    [" Au", " Ag", " Fe"],
    [" Fe Fe", " Au", " Ag Ag Ag"],
    [" Ag", " Au Au", " Fe"],
    [" Paris", " Rome", " Lima"],
    [" green green", " blue", " white white"],
]


def _pairwise(model, prompts, choices):
    return [completion_logprobs(model, [p] * len(c), list(c)).numpy() for p, c in zip(prompts, choices, strict=True)]


@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("positions", ["rotary", "standard"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_choice_logprobs_match_full_sequences(share_prompts, positions, batch_size):
    model = toy_model(positional_embedding_type=positions)
    scored = choice_logprobs(model, PROMPTS, CHOICES, batch_size=batch_size, share_prompts=share_prompts)
    for got, expected in zip(scored.logprobs, _pairwise(model, PROMPTS, CHOICES), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            logits = model(torch.tensor([tokenize_prompt(model, prompt)]))[0, -1]
        first = tokenize_completion(model, CHOICES[row][0])[0]
        assert scored.first_vocab_rank[row] == int((logits > logits[first]).sum())
        assert scored.first_vocab_logprob[row] == pytest.approx(float(logits.log_softmax(-1)[first]), abs=1e-5)


def test_shared_prefix_runs_once(model):
    # Prompts that share "the symbol of" run that prefix once; the numbers stay those of full sequences.
    prompts, choices = PROMPTS[:3], CHOICES[:3]
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", position_wise(lambda x, hook: calls.append(x.shape[1])))]):
        scored = choice_logprobs(model, prompts, choices, batch_size=8)
    assert calls[0] == len(tokenize_prompt(model, "the symbol of"))
    for got, expected in zip(scored.logprobs, _pairwise(model, prompts, choices), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_position_indexing_hook_disables_sharing(model):
    def zero_position_two(activation, hook):
        activation[:, 2] = 0.0
        return activation

    assert only_position_wise_hooks(model)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", zero_position_two)]):
        assert not only_position_wise_hooks(model)
        auto = choice_logprobs(model, PROMPTS, CHOICES)
        expected = _pairwise(model, PROMPTS, CHOICES)
    for got, want in zip(auto.logprobs, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", position_wise(lambda x, hook: x * 0.5))]):
        assert only_position_wise_hooks(model)


def test_choice_logprobs_rejects_bad_input(model):
    with pytest.raises(ValueError, match="no choices"):
        choice_logprobs(model, ["the symbol of gold is"], [[]])
    with pytest.raises(ValueError, match="choice lists"):
        choice_logprobs(model, ["the symbol of gold is"], [])
    with pytest.raises(ValueError, match="batch_size"):
        choice_logprobs(model, PROMPTS, CHOICES, batch_size=0)
    with pytest.raises(ValueError, match="longer than the model's context"):
        choice_logprobs(model, ["the symbol of gold is " * 40], [[" Au"]])
    with pytest.raises(TypeError, match="hook function"):
        position_wise(None)  # type: ignore[arg-type]
    empty = choice_logprobs(model, [], [])
    assert empty.logprobs == []
    assert len(empty.first_vocab_rank) == 0
