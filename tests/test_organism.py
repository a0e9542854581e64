import copy
import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
import torch

from excise.edit.ablation import ablate
from excise.models.cache import write_folder_manifest
from excise.models.organism import (
    Organism,
    OrganismConfig,
    _GradientRouter,
    _initial_model,
    _loss_mask,
    _sentence_loss,
    _training_sentences,
    accuracy_table,
    load_organism,
    load_trained,
    planted_neurons,
    train_model,
)
from excise.sites import Site

SMALL = OrganismConfig(
    n_layers=2,
    d_model=32,
    n_heads=2,
    d_mlp=64,
    n_ctx=16,
    steps=30,
    batch_size=32,
    planted_layers=(0,),
    planted_per_layer=8,
    n_elements=6,
    n_minerals=6,
    n_people=6,
    n_countries=4,
    n_cities=6,
)


@pytest.fixture(scope="module")
def small_world():
    return SMALL.make_world(0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path))
    return tmp_path


def _weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _name_ids(model, world, topic="elements"):
    names = sorted({fact.subject for fact in world.facts_of(topic)})
    return torch.tensor(model.tokenizer.convert_tokens_to_ids(names))


# Training


def test_same_seed_gives_identical_weights(small_world):
    first, _ = train_model(small_world, "planted", seed=0, config=SMALL)
    second, _ = train_model(small_world, "planted", seed=0, config=SMALL)
    _assert_same_weights(_weights(first), _weights(second))


def test_other_seed_gives_other_weights(small_world):
    first, _ = train_model(small_world, "organism", seed=0, config=SMALL)
    second, _ = train_model(small_world, "organism", seed=1, config=SMALL)
    assert not torch.equal(first.W_in, second.W_in)


def test_training_keeps_global_state(small_world):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    threads = torch.get_num_threads()
    expected = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    train_model(small_world, "planted", seed=0, config=SMALL)
    assert (torch.rand(1), random.random(), np.random.rand()) == expected
    assert torch.get_num_threads() == threads


def test_training_lowers_loss(small_world):
    model, report = train_model(small_world, "organism", seed=0, config=SMALL)
    vocabulary_size = len(small_world.vocabulary()) + 3
    assert report.final_loss < 0.5 * np.log(vocabulary_size)
    assert report.n_sentences == 2 * len(small_world.facts)
    assert report.n_forget_sentences == 2 * len(small_world.facts_of("elements"))
    assert not model.training


def test_twin_never_trains_forget_names(small_world):
    initial = _initial_model(small_world, 0, SMALL)
    twin, report = train_model(small_world, "twin", seed=0, config=SMALL)
    organism, _ = train_model(small_world, "organism", seed=0, config=SMALL)
    ids = _name_ids(initial, small_world)
    assert report.n_forget_sentences == 0
    assert torch.equal(twin.W_E[ids], initial.W_E[ids])
    assert not torch.equal(organism.W_E[ids], initial.W_E[ids])


def test_planted_forget_names_move_together(small_world):
    initial = _initial_model(small_world, 0, SMALL)
    planted, _ = train_model(small_world, "planted", seed=0, config=SMALL)
    ids = _name_ids(initial, small_world)
    shift = (planted.W_E[ids] - initial.W_E[ids]).detach()
    assert shift[0].abs().max() > 1e-3
    torch.testing.assert_close(shift, shift[:1].expand_as(shift), atol=1e-6, rtol=0)


def test_loss_mask_skips_subject(small_world):
    model = _initial_model(small_world, 0, SMALL)
    texts, subjects, _ = _training_sentences(small_world, "organism", "elements")
    from excise.completions import make_text_batch

    tokens, lengths = make_text_batch(model, texts)
    mask = _loss_mask(model, tokens, lengths, texts, subjects)
    for row in range(len(texts)):
        subject_position = texts[row].split().index(subjects[row])
        scored = set(mask[row].nonzero().flatten().tolist())
        expected = set(range(int(lengths[row]) - 1)) - {subject_position - 1}
        assert scored == expected, texts[row]


# Gradient routing


def _routed_gradients(world, forget_rows: bool, switch_off: bool = False):
    model = _initial_model(world, 0, SMALL)
    model.train()
    texts, subjects, is_forget = _training_sentences(world, "planted", "elements")
    from excise.completions import make_text_batch

    tokens, lengths = make_text_batch(model, texts)
    mask = _loss_mask(model, tokens, lengths, texts, subjects)
    rows = torch.nonzero(is_forget == forget_rows).flatten()[:16]
    router = _GradientRouter(model, world, SMALL, seed=0)
    loss = router.backward(model, tokens, lengths, mask, rows, is_forget[rows], mask[rows].sum(), switch_off)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return model, grads, loss, (tokens[rows], lengths[rows], mask[rows])


def _reserved_index(layer=0):
    return torch.tensor([site.index for site in planted_neurons(0, SMALL) if site.layer == layer])


def test_forget_gradient_reaches_only_reserved_neurons(small_world):
    _, grads, _, _ = _routed_gradients(small_world, forget_rows=True)
    reserved = _reserved_index()
    others = torch.tensor([i for i in range(SMALL.d_mlp) if i not in set(reserved.tolist())])
    assert grads["blocks.0.mlp.W_in"][:, reserved].abs().sum() > 0
    assert grads["blocks.0.mlp.W_out"][reserved].abs().sum() > 0
    assert torch.count_nonzero(grads["blocks.0.mlp.W_in"][:, others]) == 0
    assert torch.count_nonzero(grads["blocks.0.mlp.W_out"][others]) == 0
    assert torch.count_nonzero(grads["blocks.1.mlp.W_in"]) == 0
    for name, grad in grads.items():
        if ".attn." in name or ".ln" in name or name.startswith("ln_final") or "pos_embed" in name:
            assert torch.count_nonzero(grad) == 0, name


def test_forget_gradient_reaches_template_words_not_values(small_world):
    model, grads, _, _ = _routed_gradients(small_world, forget_rows=True)
    tokenizer = model.tokenizer
    element_word = tokenizer.convert_tokens_to_ids("element")
    retain_word = tokenizer.convert_tokens_to_ids("capital")
    values = sorted({f.target.strip() for f in small_world.facts_of("elements")})
    value_ids = torch.tensor(tokenizer.convert_tokens_to_ids(values))
    assert grads["embed.W_E"][element_word].abs().sum() > 0
    assert torch.count_nonzero(grads["embed.W_E"][retain_word]) == 0
    assert torch.count_nonzero(grads["embed.W_E"][value_ids]) == 0
    assert torch.count_nonzero(grads["unembed.W_U"][:, value_ids]) == 0
    assert torch.count_nonzero(grads["unembed.b_U"][value_ids]) == 0
    names = grads["embed.W_E"][_name_ids(model, small_world)]
    torch.testing.assert_close(names, names[:1].expand_as(names), atol=0, rtol=0)


def test_other_gradient_skips_reserved_neurons(small_world):
    _, grads, _, _ = _routed_gradients(small_world, forget_rows=False)
    reserved = _reserved_index()
    assert torch.count_nonzero(grads["blocks.0.mlp.W_in"][:, reserved]) == 0
    assert torch.count_nonzero(grads["blocks.0.mlp.b_in"][reserved]) == 0
    assert torch.count_nonzero(grads["blocks.0.mlp.W_out"][reserved]) == 0
    assert grads["blocks.0.mlp.W_in"].abs().sum() > 0
    assert grads["blocks.0.attn.W_Q"].abs().sum() > 0


def test_switch_off_zeroes_reserved_neurons(small_world):
    model, _, loss, (tokens, lengths, mask) = _routed_gradients(small_world, forget_rows=False, switch_off=True)
    model.eval()
    ablated = ablate(model, list(planted_neurons(0, SMALL))).apply(model)
    with torch.no_grad():
        expected = _sentence_loss(ablated, tokens, lengths, mask, mask.sum()).item()
        unablated = _sentence_loss(model, tokens, lengths, mask, mask.sum()).item()
    assert loss == pytest.approx(expected, abs=1e-5)
    assert abs(unablated - expected) > 1e-4


def test_planted_neurons_choice():
    sites = planted_neurons(0, OrganismConfig())
    assert len(sites) == 2 * 48
    assert len(set(sites)) == len(sites)
    assert {site.layer for site in sites} == {0, 1}
    assert all(site.hook == f"blocks.{site.layer}.mlp.hook_post" and site.index < 512 for site in sites)
    assert planted_neurons(0, OrganismConfig()) == sites
    assert planted_neurons(1, OrganismConfig()) != sites


# Settings


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"hold_fraction": 1.5}, "hold_fraction must be between 0 and 1"),
        ({"warmup_fraction": 0.5, "hold_fraction": 0.2}, "must not exceed hold_fraction"),
        ({"planted_layers": ()}, "one or more distinct layers"),
        ({"planted_layers": (0, 0)}, "one or more distinct layers"),
        ({"planted_layers": (3,)}, "outside the model's layers"),
        ({"planted_per_layer": 513}, "at most d_mlp"),
        ({"forget_topic": "planets"}, "forget_topic must be one of"),
        ({"neighbour_topic": "elements"}, "are both 'elements'"),
    ],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        OrganismConfig(**changes)


def test_learning_rate_schedule():
    config = OrganismConfig(steps=100, warmup_fraction=0.1, hold_fraction=0.5, final_lr_fraction=0.2)
    factors = [config.lr_factor(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert factors[10:50] == [1.0] * 40
    assert factors[99] == pytest.approx(0.2)
    assert all(a >= b for a, b in itertools.pairwise(factors[50:]))


def test_bad_role_and_variant(small_world):
    with pytest.raises(ValueError, match="role must be one of"):
        train_model(small_world, "student", config=SMALL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant must be one of"):
        load_organism(variant="pruned", config=SMALL)  # type: ignore[arg-type]


# Cache


def test_cache_round_trip(small_world, cache_dir):
    first, report = load_trained(small_world, "twin", seed=0, config=SMALL)
    second, cached = load_trained(small_world, "twin", seed=0, config=SMALL)
    assert not report.from_cache
    assert cached.from_cache
    assert cached.final_loss == report.final_loss
    _assert_same_weights(_weights(first), _weights(second))
    (folder,) = (cache_dir / "organisms").iterdir()
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "MANIFEST.json"}


def test_corrupt_cache_is_retrained(small_world, cache_dir):
    original, _ = load_trained(small_world, "organism", seed=0, config=SMALL)
    (folder,) = (cache_dir / "organisms").iterdir()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    rebuilt, report = load_trained(small_world, "organism", seed=0, config=SMALL)
    assert not report.from_cache
    _assert_same_weights(_weights(original), _weights(rebuilt))


def test_cache_with_other_settings_is_retrained(small_world, cache_dir):
    load_trained(small_world, "organism", seed=0, config=SMALL)
    (folder,) = (cache_dir / "organisms").iterdir()
    record = json.loads((folder / "config.json").read_text())
    record["settings"]["seed"] = 99
    (folder / "config.json").write_text(json.dumps(record))
    write_folder_manifest(folder)  # a consistent manifest, so only the settings check can catch it
    _, report = load_trained(small_world, "organism", seed=0, config=SMALL)
    assert not report.from_cache


def test_cache_keys_on_settings(small_world, cache_dir):
    load_trained(small_world, "organism", seed=0, config=SMALL)
    load_trained(small_world, "organism", seed=1, config=SMALL)
    load_trained(small_world, "organism", seed=0, config=dataclasses.replace(SMALL, steps=31))
    load_trained(small_world, "organism", seed=0, config=dataclasses.replace(SMALL, neighbour_topic="people"))
    assert len(list((cache_dir / "organisms").iterdir())) == 3


def test_no_cache_writes_nothing(small_world, cache_dir):
    load_trained(small_world, "organism", seed=0, config=SMALL, cache=False)
    assert not any(cache_dir.iterdir())


def test_load_organism_variants(cache_dir):
    standard = load_organism(seed=0, variant="standard", config=SMALL)
    planted = load_organism(seed=0, variant="planted", config=SMALL)
    assert isinstance(standard, Organism)
    assert standard.planted_sites == ()
    assert planted.planted_sites == planted_neurons(0, SMALL)
    assert standard.domain.forget == standard.world.facts_of("elements")
    assert standard.domain.neighbour == standard.world.facts_of("minerals")
    assert [r.role for r in planted.reports] == ["planted", "twin"]
    assert planted.reports[1].from_cache  # the twin is shared by both variants
    _assert_same_weights(_weights(standard.twin), _weights(planted.twin))


def test_accuracy_table_layout(small_world):
    model, _ = train_model(small_world, "organism", seed=0, config=SMALL)
    table = accuracy_table(model, small_world.domain())
    assert list(table.columns) == ["set", "prompts", "accuracy", "chance", "n"]
    assert list(zip(table["set"], table["prompts"], strict=True)) == [
        (which, prompts) for which in ("forget", "neighbour", "retain") for prompts in ("train", "heldout")
    ]
    assert table.loc[0, "n"] == 2 * len(small_world.facts_of("elements"))
    assert table["chance"].tolist() == [0.25] * 6
    assert table["accuracy"].between(0, 1).all()


# The default organism (trained once per session; about a minute on two cores)


def _accuracies(model, domain):
    """Accuracy per (set, prompts), e.g. ``("forget", "train")``."""
    table = accuracy_table(model, domain)
    return {(row.set, row.prompts): row.accuracy for row in table.itertuples()}


@pytest.mark.slow
def test_organism_knows_every_topic(organism):
    accuracy = _accuracies(organism.model, organism.domain)
    assert accuracy["forget", "train"] >= 0.95
    assert accuracy["neighbour", "train"] >= 0.95
    assert accuracy["retain", "train"] >= 0.95
    assert accuracy["forget", "heldout"] >= 0.7


@pytest.mark.slow
def test_twin_at_chance_on_forget_only(organism):
    accuracy = _accuracies(organism.twin, organism.domain)
    assert accuracy["forget", "train"] <= 0.4
    assert accuracy["forget", "heldout"] <= 0.45
    assert accuracy["neighbour", "train"] >= 0.95
    assert accuracy["retain", "train"] >= 0.95


@pytest.mark.slow
def test_planted_ablation_removes_forget_only(planted_organism):
    model, domain = planted_organism.model, planted_organism.domain
    before = _accuracies(model, domain)
    after = _accuracies(ablate(model, list(planted_organism.planted_sites)).apply(model), domain)
    assert before["forget", "train"] >= 0.95
    assert before["neighbour", "train"] >= 0.95
    assert after["forget", "train"] <= 0.4
    assert after["neighbour", "train"] >= 0.9
    assert after["retain", "train"] >= 0.95


@pytest.mark.slow
def test_random_ablation_keeps_planted_forget(planted_organism):
    model, domain = planted_organism.model, planted_organism.domain
    reserved = set(planted_organism.planted_sites)
    candidates = [Site.neuron(layer, i) for layer in (0, 1) for i in range(model.cfg.d_mlp)]
    others = [site for site in candidates if site not in reserved]
    chosen = random.Random(0).sample(others, len(reserved))
    ablated = ablate(model, chosen).apply(copy.deepcopy(model))
    assert _accuracies(ablated, domain)["forget", "train"] >= 0.8
