import math

import pytest
import torch

from excise.completions import tokenize_prompt
from excise.edit.ablation import ablate
from excise.sites import Site
from excise.verify.accuracy import score_facts
from excise.verify.behaviour import (
    BehaviourSettings,
    generate_greedy,
    generation_scores,
    measure_behaviour,
    perplexity,
)
from excise.verify.suite import with_hooks
from tests.helpers import toy_model
from tests.verify_helpers import trained_domain, trained_model


@pytest.fixture(scope="module")
def model():
    return trained_model()


def _manual_greedy(model, prompt, n):
    ids = tokenize_prompt(model, prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_generate_greedy_matches_loop_without_cache(model):
    domain = trained_domain()
    # Prompts of two token lengths share a batch, so the padding after the shorter one is masked in the cache.
    prompts = [domain.forget[0].prompt, domain.forget[0].paraphrases[0], domain.retain[1].prompt]
    outputs = generate_greedy(model, prompts, max_new_tokens=3, batch_size=2)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == model.tokenizer.decode(_manual_greedy(model, prompt, 3))


def test_generate_greedy_on_llama_layout_matches_loop():
    model = toy_model(n_ctx=32)
    prompts = ["the symbol of gold is", "the capital of Peru is", "the colour of sky is"]
    outputs = generate_greedy(model, prompts, max_new_tokens=4)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == model.tokenizer.decode(_manual_greedy(model, prompt, 4))


def test_trained_model_states_its_facts(model):
    facts = trained_domain().forget[:6]
    table = generation_scores(model, facts, max_new_tokens=2)
    assert table["stated"].all() and table["mentioned"].all()
    assert list(table["id"]) == [f.id for f in facts]


@pytest.mark.parametrize("share_prompts", [True, False])
def test_vocab_rank_counts_tokens_above_target(model, share_prompts):
    facts = trained_domain().all_facts()
    table = score_facts(model, facts, share_prompts=share_prompts).table
    for fact, row in zip(facts, table.itertuples(), strict=True):
        logits = model(torch.tensor([tokenize_prompt(model, fact.prompt)]))[0, -1]
        target = model.tokenizer.encode(fact.target, add_special_tokens=False)[0]
        assert row.vocab_rank == int((logits > logits[target]).sum())
        torch.testing.assert_close(row.vocab_logprob, float(logits.log_softmax(-1)[target]), atol=1e-5, rtol=0)


def test_perplexity_matches_manual_mean_nll(model):
    texts = ["the symbol of elkalo is Skalo .", "the capital of coka is"]
    value, count = perplexity(model, texts, batch_size=1)
    total, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenize_prompt(model, text)])
        log_probs = model(ids)[0].log_softmax(-1)
        total -= float(log_probs[:-1].gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert count == n
    torch.testing.assert_close(value, math.exp(total / n), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(model, [])


def test_measure_behaviour_summary_is_consistent(model):
    domain = trained_domain()
    sets = {"forget": domain.forget, "retain": domain.retain}
    behaviour = measure_behaviour(model, sets, ["the capital of coka is Cka ."], BehaviourSettings(generation_facts=3))
    summary = behaviour.summary()
    assert summary["forget"]["accuracy"] == score_facts(model, domain.forget).accuracy == 1.0
    assert summary["forget"]["generation_n"] == 3
    assert behaviour.tables["forget"]["stated"].isna().sum() == len(domain.forget) - 3
    assert summary["generic_text"]["n_tokens"] == 6  # seven words, six predicted
    assert not behaviour.chat_template


def test_hooked_copy_behaves_like_hooks_context(model):
    domain = trained_domain()
    edit = ablate(model, [Site.neuron(1, i) for i in range(0, 128, 2)])
    with edit.hooks(model):
        inside = score_facts(model, domain.forget).table
    hooked = with_hooks(edit, model)
    # run_with_cache adds and resets its own hooks; the edit's hooks must survive it.
    hooked.run_with_cache(torch.tensor([[5, 6, 7]]))
    copied = score_facts(hooked, domain.forget).table
    torch.testing.assert_close(
        torch.tensor(copied["target_logprob"].to_numpy()), torch.tensor(inside["target_logprob"].to_numpy())
    )
    baseline = score_facts(model, domain.forget).table  # the original has no hooks left
    assert not torch.allclose(
        torch.tensor(baseline["target_logprob"].to_numpy()), torch.tensor(copied["target_logprob"].to_numpy())
    )


def test_settings_checks():
    with pytest.raises(ValueError, match="max_new_tokens"):
        BehaviourSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="generation_facts"):
        BehaviourSettings(generation_facts=-1)
