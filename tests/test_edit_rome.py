"""ROME and MEMIT on tiny models: efficacy, exactness of the rank-one update, the blow-up guard, key statistics."""

from __future__ import annotations

import math

import pytest
import torch

from excise.completions import completion_logprobs, make_text_batch
from excise.edit import (
    DeltaSettings,
    EditRejectedError,
    RewriteRequest,
    WeightDelta,
    key_second_moment,
    load_edit,
    memit,
    rank_one_update,
    rewrite_scores,
    rome,
    rome_in_turn,
    subject_keys,
    subject_position,
)
from excise.edit.metrics import ngram_entropy
from tests.edit_models import (
    MODEL_BUILDERS,
    REFERENCE_TEXTS,
    state_copy,
    subject_final_facts,
    tiny_domain,
    trained_model,
)

PREFIXES = ("", "it is a")
# Tiny models have small W_out matrices, so a working rank-one update is large relative to them; the default limit
# of 1.0 suits real models (a ROME edit of SmolLM2-135M changes W_out by about 6%).
LOOSE = {"max_relative_update": 20.0}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _stats(model, layers):
    return key_second_moment(model, layers, list(REFERENCE_TEXTS) * 4, use_cache=False)


def test_subject_position_uses_offsets():
    model = MODEL_BUILDERS["gpt_like"]()
    assert subject_position(model, "the symbol of gold is", "gold") == 3
    assert subject_position(model, "gold and gold is", "gold") == 2  # the last occurrence
    with pytest.raises(ValueError, match="does not occur"):
        subject_position(model, "the symbol of iron is", "gold")


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_rome_rewrites_fact(arch):
    model = trained_model(arch)
    fact = subject_final_facts()[0]
    request = RewriteRequest(fact, " Ne")
    layer = 1
    stats = _stats(model, [layer])
    before = state_copy(model)
    edit = rome(model, request, layer, second_moment=stats[layer], prefixes=PREFIXES, **LOOSE)
    edited = edit.apply(model)

    old, new = completion_logprobs(edited, [fact.prompt] * 2, [fact.target, " Ne"]).tolist()
    assert new > old
    assert new > math.log(0.5), "the new target should be the most likely continuation"
    original_old, original_new = completion_logprobs(model, [fact.prompt] * 2, [fact.target, " Ne"]).tolist()
    assert original_new < original_old
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"rome changed the caller's {name}"
    assert edit.describe()["parameter"].tolist() == [f"blocks.{layer}.mlp.W_out"]
    assert edit.describe()["rank"].tolist() == [1]


def test_rome_in_turn_rewrites_each_fact():
    model = trained_model("llama_like")
    facts = subject_final_facts()[:2]
    requests = [RewriteRequest(facts[0], " Ne"), RewriteRequest(facts[1], " Ne")]
    layer = 1
    stats = _stats(model, [layer])
    before = state_copy(model)
    sequence = rome_in_turn(model, requests, layer, second_moment=stats[layer], prefixes=PREFIXES, **LOOSE)
    edited = sequence.apply(model)
    assert len(sequence.edits) == 2
    for fact in facts:
        old, new = completion_logprobs(edited, [fact.prompt] * 2, [fact.target, " Ne"]).tolist()
        assert new > old, f"{fact.id} was not rewritten"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"rome_in_turn changed the caller's {name}"
    with pytest.raises(ValueError, match="at least one"):
        rome_in_turn(model, [], layer, second_moment=stats[layer])
    with pytest.raises(ValueError, match="out of range"):
        rome_in_turn(model, requests, 99, second_moment=stats[layer])


def test_rank_one_update_is_exact_for_the_key():
    model = trained_model("llama_like")
    fact = subject_final_facts()[1]
    request = RewriteRequest(fact, " Au")
    layer = 2
    stats = _stats(model, [layer])
    edit = rome(model, request, layer, second_moment=stats[layer], prefixes=PREFIXES, **LOOSE)
    key = subject_keys(model, layer, [request], PREFIXES)[0]
    left, right = edit.low_rank[f"blocks.{layer}.mlp.W_out"]
    # k*^T (W + u delta^T) = k*^T W + delta exactly, because k*^T u = 1.
    torch.testing.assert_close(key @ left, torch.ones(1), atol=1e-4, rtol=0)
    assert float(right.norm()) == pytest.approx(edit.info["delta_norm"], rel=1e-5)


def test_rome_make_unknown():
    model = trained_model("gpt_like")
    fact = subject_final_facts()[0]
    layer = 1
    stats = _stats(model, [layer])
    edit = rome(model, RewriteRequest(fact, None), layer, second_moment=stats[layer], prefixes=PREFIXES, **LOOSE)
    edited = edit.apply(model)
    tokens = make_text_batch(model, [fact.prompt])[0]
    entropies = []
    for candidate in (model, edited):
        log_probs = candidate(tokens)[0, -1].log_softmax(-1)
        entropies.append(float(-(log_probs.exp() * log_probs).sum()))
    assert entropies[1] > entropies[0] + 1.0
    old_before, old_after = (completion_logprobs(m, [fact.prompt], [fact.target])[0] for m in (model, edited))
    assert old_after < old_before - 1.0
    assert edit.info["entropy_fraction"] >= 0.5


def test_guard_rejects_ordinary_key():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 16, generator=generator)
    second_moment = keys.T @ keys / 500
    weight = torch.randn(16, 8, generator=generator)
    delta = torch.randn(8, generator=generator)
    rare = torch.linalg.eigh(second_moment).eigenvectors[:, 0] * 3.0  # along the least-used key direction
    _, _, stats = rank_one_update(rare, delta, second_moment, weight, max_relative_update=100.0)
    assert stats["spillover"] < 0.5
    tiny = keys[0] * 1e-3  # a near-zero key: k^T C^-1 k is near zero
    with pytest.raises(EditRejectedError, match="near zero"):
        rank_one_update(tiny, delta, second_moment, weight)
    with pytest.raises(EditRejectedError, match="not positive"):
        rank_one_update(torch.zeros(16), delta, second_moment, weight)
    with pytest.raises(EditRejectedError, match="times that of W_out"):
        rank_one_update(rare, delta * 1e4, second_moment, weight)


def test_second_moment_cached(cache_dir):
    model = MODEL_BUILDERS["gpt_like"]()
    texts = list(REFERENCE_TEXTS)
    first = key_second_moment(model, [0, 2], texts, n_tokens=40)
    files = sorted(cache_dir.rglob("*.safetensors"))
    assert len(files) == 2
    second = key_second_moment(model, [2, 0], texts, n_tokens=40)
    for layer in (0, 2):
        assert torch.equal(first[layer], second[layer])
        assert first[layer].dtype == torch.float32
        assert first[layer].shape == (model.cfg.d_mlp, model.cfg.d_mlp)

    # The statistics are E[k k^T] over real tokens of whole batches until n_tokens is reached.
    tokens, lengths = make_text_batch(model, texts, max_tokens=128)
    _, cache = model.run_with_cache(tokens)
    mask = torch.arange(tokens.shape[1]) < lengths.unsqueeze(1)
    keys = cache["blocks.2.mlp.hook_post"][mask].double()
    torch.testing.assert_close(first[2], (keys.T @ keys / len(keys)).float(), atol=1e-5, rtol=1e-4)

    # A corrupted entry is detected and recomputed.
    files[0].write_bytes(b"broken")
    again = key_second_moment(model, [0, 2], texts, n_tokens=40)
    assert torch.equal(again[0], first[0])
    # Other weights give another cache entry.
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(1.5)
    key_second_moment(model, [2], texts, n_tokens=40)
    assert len(sorted(cache_dir.rglob("*.safetensors"))) == 3


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_memit_rewrites_many_facts(arch):
    model = trained_model(arch)
    domain = tiny_domain()
    new_targets = [" Ne", " Au", " Fe"]
    facts = subject_final_facts()[:3]
    requests = [RewriteRequest(fact, new) for fact, new in zip(facts, new_targets, strict=True)]
    layers = [0, 1]
    edit = memit(
        model,
        requests,
        layers,
        second_moments=_stats(model, layers),
        prefixes=PREFIXES,
        covariance_weight=10.0,
        **LOOSE,
    )
    edited = edit.apply(model)
    scores = rewrite_scores(model, edited, requests, domain.retain, max_new_tokens=5)
    assert scores.efficacy == 1.0
    assert len(scores.table) == 6  # one prompt and one paraphrase per request
    assert sorted(edit.low_rank) == ["blocks.0.mlp.W_out", "blocks.1.mlp.W_out"]
    for left, right in edit.low_rank.values():
        assert left.shape[1] == right.shape[0] == 3
    assert edit.info["final_gap_norm"] < edit.info["delta_norm"]


def test_memit_rejects_conflicts():
    model = MODEL_BUILDERS["gpt_like"]()
    fact = tiny_domain().forget[0]
    with pytest.raises(ValueError, match="different targets"):
        memit(model, [RewriteRequest(fact, " Ne"), RewriteRequest(fact, " Fe")], [0])


def test_request_validation():
    fact = tiny_domain().forget[0]
    with pytest.raises(ValueError, match="equals the current target"):
        RewriteRequest(fact, fact.target)
    import dataclasses

    with pytest.raises(ValueError, match="no subject"):
        RewriteRequest(dataclasses.replace(fact, subject=None), " Ne")
    with pytest.raises(ValueError, match="does not occur"):
        RewriteRequest(dataclasses.replace(fact, subject="copper"), " Ne")
    with pytest.raises(ValueError, match="steps"):
        DeltaSettings(steps=0)


def test_rome_edit_saves_and_loads(tmp_path):
    model = trained_model("llama_like")
    fact = subject_final_facts()[2]
    edit = rome(model, RewriteRequest(fact, " Fe"), 1, second_moment=_stats(model, [1])[1], prefixes=PREFIXES, **LOOSE)
    loaded = load_edit(edit.save(tmp_path / "rome"))
    assert isinstance(loaded, WeightDelta)
    assert loaded.method == "rome"
    assert loaded.info["layer"] == 1
    tokens = make_text_batch(model, [fact.prompt])[0]
    torch.testing.assert_close(loaded.apply(model)(tokens), edit.apply(model)(tokens), rtol=0, atol=0)


def test_ngram_entropy():
    assert ngram_entropy("a a a a a a") == 0.0
    # Five distinct bigrams and four distinct trigrams: (2/3 log2 5 + 4/3 log2 4) / 2.
    expected = (2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2
    assert ngram_entropy("a b c d e f") == pytest.approx(expected)
