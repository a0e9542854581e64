import pytest
import torch

from excise.completions import completion_logprobs, make_batch, make_text_batch
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
