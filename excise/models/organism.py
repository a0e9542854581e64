"""The model organism: a tiny transformer trained from scratch on a synthetic world, so that what it knows, what
it never saw and (in the planted variant) where it keeps one topic are all known in advance.

Interpretability methods are rarely checked against a known answer, and unlearning is rarely compared with a
model that never learned the domain. The organism gives both. :func:`load_organism` trains (or loads from the
cache) up to three models on the world of :mod:`excise.data.synthetic`, all from the same initial weights, data
order and settings:

- the **organism**, trained on every topic;
- its **twin**, trained on every topic except the forget topic. The twin is what unlearning should reach: it
  answers forget facts at chance and has never seen the forget entities;
- the **planted** model, trained on every topic with gradient routing (Cloud et al., 2024, "Gradient Routing:
  Masking Gradients to Localize Computation in Neural Networks"). The gradient of each forget sentence is masked
  so that it updates only a reserved set of MLP neurons, and the gradient of every other sentence is masked so
  that it never updates those neurons. The forget facts can then only live in the reserved neurons
  (:attr:`Organism.planted_sites`): locate methods are scored by precision and recall against them, and ablating
  them should bring forget accuracy to chance, like the twin, while the other topics stay.

Gradient routing in detail. A forget sentence updates

- the reserved neurons: their columns of ``W_in``, entries of ``b_in`` and rows of ``W_out``;
- the embedding and unembedding vectors of the forget topic's template words, the words of forget sentences
  that are neither an entity name nor an attribute value ("element", "Chemists"). They are the same for every
  forget entity, so they cannot store a fact, and without them the model could not read the forget prompts;
- one shift shared by every forget entity-name embedding: the mean of their gradients is applied to each, so
  the names can move away from their random start together, but no name gets a direction of its own.

It updates nothing else: no attention or layer-norm weight, no other neuron, no entity name on its own and no
attribute value's unembedding. Every other sentence updates every parameter except the reserved neurons.

For the first 85% of the steps (``planted_off_fraction``) the reserved neurons are also switched off, their
output set to zero, for every sentence outside the forget topic. The rest of the network then learns the other
topics without them and does not work against what they learn; in the last steps they are on, so the rest of
the network learns to tolerate their output on the other topics. Variants tried while building this recipe (seeds
0 to 2): with the neurons always on, forget accuracy stalled below 85% on one seed of three. With them never
on, the planted model scored 85% to 92% on the neighbour minerals, whose sentences resemble the elements' and
make the reserved neurons fire. Letting forget sentences also train the attention query and key weights left
forget accuracy near 50% after the ablation (chance is 25%), so facts had leaked there.

Training (:func:`train_model`): next-token cross-entropy on every token except the entity name (a name cannot
be predicted from the words before it, so its loss is irreducible noise), AdamW without weight decay, a linear
warm-up, a constant learning rate, then a cosine decay (:class:`OrganismConfig`). The planted model learns its
forget facts late, through the reserved neurons only, which is why the learning rate holds for most of training.

Warning:
    Same seed and settings give bit-identical weights with the same torch build on the same kind of CPU.
    Training runs on one thread (restored afterwards) so that the thread count cannot change the result, but
    other CPUs or torch builds may pick other kernels and differ in the last bits, and the cache does not key on
    the machine. Training uses no global random state; :func:`excise.models.tiny.tiny_model` restores it after
    seeding. Changing the thread count is not safe while another Python thread runs torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
import safetensors.torch
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.completions import make_text_batch
from excise.data.facts import FACT_SETS, Domain
from excise.data.synthetic import TOPICS, SyntheticWorld, Topic, make_world, prompt_variants, train_prompts
from excise.models.cache import (
    CacheCorruptError,
    cache_path,
    cached_folder,
    discard,
    settings_key,
)
from excise.models.tiny import tiny_model
from excise.sites import Site
from excise.verify.accuracy import score_facts

__all__ = [
    "ROLES",
    "VARIANTS",
    "Organism",
    "OrganismConfig",
    "Role",
    "TrainingReport",
    "Variant",
    "accuracy_table",
    "load_organism",
    "load_trained",
    "planted_neurons",
    "train_model",
]

logger = logging.getLogger(__name__)

Variant = Literal["standard", "planted"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
Role = Literal["organism", "twin", "planted"]
ROLES: tuple[Role, ...] = get_args(Role)

RECIPE_VERSION = 1
"""Part of every cache key; raise it when a change to the training code changes the weights it produces."""

_MODEL_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class OrganismConfig:
    """Settings of the world, the models and their training. The defaults train all three models in about a
    minute on two CPU cores (see ``docs/benchmarks-organism.md``).

    Attributes:
        n_layers: Transformer blocks.
        d_model: Residual stream width.
        n_heads: Attention heads per block.
        d_mlp: MLP neurons per block.
        n_ctx: Context length; training sentences are at most 10 tokens.
        steps: Optimizer steps, the same for every model.
        batch_size: Sentences per step, drawn from a seeded shuffle of the training sentences, epoch by epoch.
        lr: Peak AdamW learning rate.
        warmup_fraction: Fraction of ``steps`` with a linear warm-up from 0 to ``lr``.
        hold_fraction: Fraction of ``steps`` after which the learning rate decays (cosine) to
            ``final_lr_fraction * lr`` at the last step.
        final_lr_fraction: Learning rate at the last step, as a fraction of ``lr``.
        planted_layers: Layers whose MLP contains reserved neurons in the planted model.
        planted_per_layer: Reserved neurons per planted layer, chosen at random from the seed.
        planted_off_fraction: Fraction of ``steps`` during which the reserved neurons are switched off (output
            zero) for sentences outside the forget topic; see the module docstring.
        forget_topic: Topic left out of the twin and routed to the reserved neurons in the planted model.
        neighbour_topic: Topic used as the domain's neighbour facts; it does not change training.
        n_elements: Elements in the world (see :func:`excise.data.synthetic.make_world`).
        n_minerals: Minerals in the world.
        n_people: People in the world.
        n_countries: Countries in the world.
        n_cities: Cities in the world.
    """

    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 32
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    warmup_fraction: float = 0.05
    hold_fraction: float = 0.6
    final_lr_fraction: float = 0.1
    planted_layers: tuple[int, ...] = (0, 1)
    planted_per_layer: int = 48
    planted_off_fraction: float = 0.85
    forget_topic: Topic = "elements"
    neighbour_topic: Topic = "minerals"
    n_elements: int = 24
    n_minerals: int = 24
    n_people: int = 32
    n_countries: int = 16
    n_cities: int = 24

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "steps", "batch_size", "planted_per_layer"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"OrganismConfig.{field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"OrganismConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not self.lr > 0:
            raise ValueError(f"OrganismConfig.lr must be > 0, got {self.lr}")
        for field in ("warmup_fraction", "hold_fraction", "final_lr_fraction", "planted_off_fraction"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"OrganismConfig.{field} must be between 0 and 1, got {value}")
        if self.warmup_fraction > self.hold_fraction:
            raise ValueError(
                f"OrganismConfig.warmup_fraction ({self.warmup_fraction}) must not exceed hold_fraction "
                f"({self.hold_fraction}): the decay starts after the warm-up"
            )
        if not self.planted_layers or len(set(self.planted_layers)) != len(self.planted_layers):
            raise ValueError(
                f"OrganismConfig.planted_layers must name one or more distinct layers, got {self.planted_layers}"
            )
        for layer in self.planted_layers:
            if not 0 <= layer < self.n_layers:
                raise ValueError(
                    f"OrganismConfig.planted_layers contains {layer}, outside the model's layers 0..{self.n_layers - 1}"
                )
        if self.planted_per_layer > self.d_mlp:
            raise ValueError(
                f"OrganismConfig.planted_per_layer ({self.planted_per_layer}) must be at most d_mlp ({self.d_mlp})"
            )
        for field in ("forget_topic", "neighbour_topic"):
            if getattr(self, field) not in TOPICS:
                raise ValueError(f"OrganismConfig.{field} must be one of {TOPICS}, got {getattr(self, field)!r}")
        if self.forget_topic == self.neighbour_topic:
            raise ValueError(f"OrganismConfig.forget_topic and neighbour_topic are both {self.forget_topic!r}")

    def make_world(self, seed: int) -> SyntheticWorld:
        """Return the synthetic world of these settings for ``seed``."""
        return make_world(
            seed,
            n_elements=self.n_elements,
            n_minerals=self.n_minerals,
            n_people=self.n_people,
            n_countries=self.n_countries,
            n_cities=self.n_cities,
        )

    def lr_factor(self, step: int) -> float:
        """Learning rate at ``step`` (0-based) as a fraction of :attr:`lr`."""
        warmup = max(1, round(self.warmup_fraction * self.steps))
        hold = round(self.hold_fraction * self.steps)
        if step < warmup:
            return (step + 1) / warmup
        if step < hold:
            return 1.0
        progress = (step - hold) / max(1, self.steps - 1 - hold)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.final_lr_fraction + (1.0 - self.final_lr_fraction) * cosine


@dataclasses.dataclass(frozen=True)
class TrainingReport:
    """How one model was trained.

    Attributes:
        role: ``"organism"``, ``"twin"`` or ``"planted"``.
        seed: Seed of the world, the initial weights, the data order and the reserved neurons.
        steps: Optimizer steps.
        seconds: Wall-clock training time; for a model read from the cache, the time of the run that wrote it.
        cpu_seconds: CPU time of the process during training. Training uses one thread, so on an idle machine
            this is close to ``seconds``. On a busy machine it is the better measure of the work done.
        final_loss: Mean training loss (nats per scored token) over the last 10 steps.
        n_sentences: Training sentences.
        n_forget_sentences: Training sentences of the forget topic (0 for the twin).
        from_cache: True when the model was read from the cache instead of trained.
    """

    role: Role
    seed: int
    steps: int
    seconds: float
    cpu_seconds: float
    final_loss: float
    n_sentences: int
    n_forget_sentences: int
    from_cache: bool = False


@dataclasses.dataclass(frozen=True)
class Organism:
    """A trained model, its twin and the world they learned.

    Attributes:
        model: The organism (``variant="standard"``) or the planted model (``variant="planted"``).
        twin: The model trained identically without the forget topic.
        domain: Forget, neighbour and retain facts of the world (``world.domain(...)``).
        world: The synthetic world.
        variant: ``"standard"`` or ``"planted"``.
        seed: Seed of world, weights and data order.
        config: Settings the models were trained with.
        planted_sites: The reserved neurons of the planted model (``blocks.L.mlp.hook_post`` sites); empty for
            the standard variant.
        reports: Training reports of ``model`` and ``twin``, in that order.
    """

    model: HookedTransformer
    twin: HookedTransformer
    domain: Domain
    world: SyntheticWorld
    variant: Variant
    seed: int
    config: OrganismConfig
    planted_sites: tuple[Site, ...] = ()
    reports: tuple[TrainingReport, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Organism(variant={self.variant!r}, seed={self.seed}, domain={self.domain!r}, "
            f"planted_sites={len(self.planted_sites)})"
        )


def load_organism(
    seed: int = 0, variant: Variant = "standard", *, cache: bool = True, config: OrganismConfig | None = None
) -> Organism:
    """Return a trained organism (or planted model) and its twin, loading both from the cache when possible.

    Args:
        seed: Seed of the world, the initial weights, the data order and the reserved neurons.
        variant: ``"standard"`` for the organism, ``"planted"`` for the model with the forget topic routed to
            known neurons. Both variants share the same twin.
        cache: Read and write the models under the excise cache folder (``$EXCISE_CACHE``, default
            ``~/.cache/excise``, in ``organisms/``), keyed by role, seed, settings and world. A corrupt entry is
            deleted and trained again. With ``cache=False`` nothing is read or written.
        config: Settings; :class:`OrganismConfig` defaults when None.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    config = config if config is not None else OrganismConfig()
    world = config.make_world(seed)
    role: Role = "organism" if variant == "standard" else "planted"
    model, report = load_trained(world, role, seed=seed, config=config, cache=cache)
    twin, twin_report = load_trained(world, "twin", seed=seed, config=config, cache=cache)
    return Organism(
        model=model,
        twin=twin,
        domain=world.domain(config.forget_topic, config.neighbour_topic),
        world=world,
        variant=variant,
        seed=seed,
        config=config,
        planted_sites=planted_neurons(seed, config) if variant == "planted" else (),
        reports=(report, twin_report),
    )


def load_trained(
    world: SyntheticWorld,
    role: Role,
    *,
    seed: int = 0,
    config: OrganismConfig | None = None,
    cache: bool = True,
) -> tuple[HookedTransformer, TrainingReport]:
    """Return one trained model of ``world`` and its report, from the cache or by :func:`train_model`."""
    config = config if config is not None else OrganismConfig()
    _check_role(role)
    if not cache:
        return train_model(world, role, seed=seed, config=config)

    settings = _cache_settings(world, role, seed, config)
    folder = cache_path("organisms", f"{role}-seed{seed}-{settings_key(settings)}")
    trained: dict[str, Any] = {}

    def build(temporary: Path) -> None:
        model, report = train_model(world, role, seed=seed, config=config)
        _save(model, report, settings, temporary)
        trained["result"] = (model, report)

    cached_folder(folder, build, metadata={"role": role, "seed": seed})
    if "result" in trained:
        return trained["result"]
    try:
        model, report = _load(folder, world, settings, config, seed)
    except CacheCorruptError as error:
        logger.warning("Retraining broken cache entry %s: %s", folder, error)
        discard(folder)
        cached_folder(folder, build, metadata={"role": role, "seed": seed})
        return trained["result"]
    logger.info("Loaded the %s model (seed %d) from %s", role, seed, folder)
    return model, report


def train_model(
    world: SyntheticWorld, role: Role, *, seed: int = 0, config: OrganismConfig | None = None
) -> tuple[HookedTransformer, TrainingReport]:
    """Train one model of ``world`` from scratch on the CPU and return it (in eval mode) with its report.

    The initial weights, the data order and the reserved neurons come from ``seed`` only, so the organism, twin
    and planted model of one seed start from the same weights and see their sentences in a seeded order. No
    global random state is read or changed.

    Args:
        world: The synthetic world; its vocabulary fixes the tokenizer, whatever the role.
        role: ``"organism"`` (every topic), ``"twin"`` (every topic but ``config.forget_topic``) or
            ``"planted"`` (every topic, with gradient routing to :func:`planted_neurons`).
        seed: Seed of the initial weights, the data order and the reserved neurons.
        config: Settings; :class:`OrganismConfig` defaults when None.
    """
    config = config if config is not None else OrganismConfig()
    _check_role(role)
    with _one_thread():
        return _train(world, role, seed, config)


def _train(
    world: SyntheticWorld, role: Role, seed: int, config: OrganismConfig
) -> tuple[HookedTransformer, TrainingReport]:
    model = _initial_model(world, seed, config)
    texts, subjects, is_forget = _training_sentences(world, role, config.forget_topic)
    tokens, lengths = make_text_batch(model, texts)
    loss_mask = _loss_mask(model, tokens, lengths, texts, subjects)
    router = _GradientRouter(model, world, config, seed) if role == "planted" else None

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    order = torch.randperm(len(texts), generator=generator)
    cursor = 0
    off_steps = round(config.planted_off_fraction * config.steps)
    losses: list[float] = []
    start, start_cpu = time.perf_counter(), time.process_time()
    logger.info("Training the %s model (seed %d, %d sentences, %d steps)", role, seed, len(texts), config.steps)
    model.train()
    for step in tqdm(range(config.steps), desc=f"training {role} model", leave=False):
        if cursor + config.batch_size > len(order):
            order = torch.randperm(len(texts), generator=generator)
            cursor = 0
        rows = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        optimizer.zero_grad(set_to_none=False)
        n_scored = loss_mask[rows].sum()
        if router is None:
            loss = _sentence_loss(model, tokens[rows], lengths[rows], loss_mask[rows], n_scored)
            loss.backward()
            losses.append(loss.item())
        else:
            switch_off = step < off_steps
            losses.append(
                router.backward(model, tokens, lengths, loss_mask, rows, is_forget[rows], n_scored, switch_off)
            )
        optimizer.step()
        schedule.step()
    model.eval()
    seconds = time.perf_counter() - start
    report = TrainingReport(
        role=role,
        seed=seed,
        steps=config.steps,
        seconds=seconds,
        cpu_seconds=time.process_time() - start_cpu,
        final_loss=sum(losses[-10:]) / len(losses[-10:]),
        n_sentences=len(texts),
        n_forget_sentences=int(is_forget.sum()),
    )
    logger.info(
        "Trained the %s model in %.1f s (%.1f s CPU), final loss %.3f",
        role,
        seconds,
        report.cpu_seconds,
        report.final_loss,
    )
    return model, report


def planted_neurons(seed: int = 0, config: OrganismConfig | None = None) -> tuple[Site, ...]:
    """Return the reserved neurons of the planted model: ``planted_per_layer`` random neurons per planted layer.

    The choice depends only on ``seed`` and the settings, so it is known without loading a model.
    """
    config = config if config is not None else OrganismConfig()
    rng = random.Random(f"planted-neurons-{seed}")
    sites = []
    for layer in config.planted_layers:
        for index in sorted(rng.sample(range(config.d_mlp), config.planted_per_layer)):
            sites.append(Site.neuron(layer, index))
    return tuple(sites)


def accuracy_table(model: HookedTransformer, domain: Domain, *, batch_size: int = 64) -> pd.DataFrame:
    """Return accuracy by likelihood ranking per fact set and prompt kind, for synthetic facts.

    One row per fact set (``forget``, ``neighbour``, ``retain``, skipping empty sets) and prompt kind
    (``"train"``: both training templates of every fact; ``"heldout"``: the held-out template), with columns
    ``set``, ``prompts``, ``accuracy``, ``chance`` and ``n`` (number of prompts scored).
    """
    rows = []
    for which in FACT_SETS:
        facts = domain.facts(which)
        if not facts:
            continue
        for prompts in ("train", "heldout"):
            scores = score_facts(
                model, prompt_variants(facts, prompts), batch_size=batch_size, description=f"scoring {which}"
            )
            rows.append(
                {
                    "set": which,
                    "prompts": prompts,
                    "accuracy": scores.accuracy,
                    "chance": scores.chance,
                    "n": len(scores.table),
                }
            )
    return pd.DataFrame(rows, columns=["set", "prompts", "accuracy", "chance", "n"])


class _GradientRouter:
    """Masks the gradients of the planted model: forget sentences reach only what may hold no fact, plus the
    reserved neurons, and other sentences never reach the reserved neurons."""

    def __init__(self, model: HookedTransformer, world: SyntheticWorld, config: OrganismConfig, seed: int) -> None:
        tokenizer = model.tokenizer
        assert tokenizer is not None  # tiny_model always sets one
        forget_facts = world.facts_of(config.forget_topic)
        names = sorted({fact.subject for fact in forget_facts if fact.subject is not None})
        values = {choice.strip() for fact in forget_facts for choice in fact.choices}
        forget_words = {word for text in world.sentences((config.forget_topic,)) for word in text.split()}
        template_words = sorted(forget_words - set(names) - values)
        self.name_ids = torch.tensor(tokenizer.convert_tokens_to_ids(names), device=model.cfg.device)
        template_ids = torch.tensor(tokenizer.convert_tokens_to_ids(template_words), device=model.cfg.device)

        # Per parameter, where a forget sentence's gradient is kept, and where another sentence's gradient is not.
        self.forget_allowed: dict[Tensor, Tensor] = {}
        self.reserved: dict[Tensor, Tensor] = {}
        by_layer: dict[int, list[int]] = {}
        for site in planted_neurons(seed, config):
            assert site.layer is not None
            by_layer.setdefault(site.layer, []).append(site.index)
        self.switch_off_hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
        for layer, indices in by_layer.items():
            mlp: Any = model.blocks[layer].mlp
            neuron_index = torch.tensor(indices, device=model.cfg.device)
            self.switch_off_hooks.append((f"blocks.{layer}.mlp.hook_post", _zero_neurons(neuron_index)))
            for parameter, neuron_axis in ((mlp.W_in, 1), (mlp.b_in, 0), (mlp.W_out, 0)):
                mask = torch.zeros_like(parameter, dtype=torch.bool)
                mask.index_fill_(neuron_axis, neuron_index, True)
                self.forget_allowed[parameter] = mask
                self.reserved[parameter] = mask
        for parameter, vocab_axis in ((model.embed.W_E, 0), (model.unembed.W_U, 1), (model.unembed.b_U, 0)):
            mask = torch.zeros_like(parameter, dtype=torch.bool)
            mask.index_fill_(vocab_axis, template_ids, True)
            self.forget_allowed[parameter] = mask
        self.embedding = model.embed.W_E

    def backward(
        self,
        model: HookedTransformer,
        tokens: Int[Tensor, "sentence pos"],
        lengths: Int[Tensor, " sentence"],
        loss_mask: Bool[Tensor, "sentence pos"],
        rows: Int[Tensor, " batch"],
        is_forget: Bool[Tensor, " batch"],
        n_scored: Tensor,
        switch_off: bool,
    ) -> float:
        """Accumulate the routed gradient of one batch into ``.grad`` and return the batch loss.

        With ``switch_off`` the reserved neurons output zero for the sentences outside the forget topic.
        """
        total = 0.0
        forget_gradients: dict[Tensor, Tensor] = {}
        forget_rows = rows[is_forget]
        if len(forget_rows):
            loss = _sentence_loss(model, tokens[forget_rows], lengths[forget_rows], loss_mask[forget_rows], n_scored)
            loss.backward()
            total += loss.item()
            for parameter, allowed in self.forget_allowed.items():
                assert parameter.grad is not None
                forget_gradients[parameter] = parameter.grad * allowed
            # The forget entity names share one update, the mean of their gradients.
            assert self.embedding.grad is not None
            forget_gradients[self.embedding][self.name_ids] = self.embedding.grad[self.name_ids].mean(dim=0)
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.zero_()
        other_rows = rows[~is_forget]
        if len(other_rows):
            with model.hooks(fwd_hooks=self.switch_off_hooks if switch_off else []):
                loss = _sentence_loss(model, tokens[other_rows], lengths[other_rows], loss_mask[other_rows], n_scored)
            loss.backward()
            total += loss.item()
        for parameter, reserved in self.reserved.items():
            assert parameter.grad is not None
            parameter.grad.masked_fill_(reserved, 0.0)
        for parameter, gradient in forget_gradients.items():
            assert parameter.grad is not None
            parameter.grad += gradient
        return total


def _zero_neurons(index: Int[Tensor, " neuron"]) -> Callable[..., Tensor]:
    def zero(activation: Float[Tensor, "batch pos d_mlp"], hook: HookPoint) -> Float[Tensor, "batch pos d_mlp"]:
        return activation.index_fill(-1, index, 0.0)

    return zero


def _sentence_loss(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    lengths: Int[Tensor, " batch"],
    loss_mask: Bool[Tensor, "batch pos"],
    n_scored: Tensor,
) -> Tensor:
    """Summed next-token cross-entropy over the scored positions of a batch, divided by ``n_scored``."""
    width = int(lengths.max())
    tokens = tokens[:, :width]
    logits = model(tokens)[:, :-1]  # position p predicts token p + 1
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    )
    return (losses * loss_mask[:, : width - 1].reshape(-1)).sum() / n_scored


def _loss_mask(
    model: HookedTransformer,
    tokens: Int[Tensor, "sentence pos"],
    lengths: Int[Tensor, " sentence"],
    texts: list[str],
    subjects: list[str],
) -> Bool[Tensor, "sentence pos"]:
    """True at each position ``p`` whose next token ``p + 1`` is scored: every real token except the subject."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    mask = positions.unsqueeze(0) < (lengths - 1).unsqueeze(1)
    tokenizer = model.tokenizer
    assert tokenizer is not None
    for row, (text, subject) in enumerate(zip(texts, subjects, strict=True)):
        # The word tokenizer gives one token per word and no BOS, so a word's index is its token position.
        position = text.split().index(subject)
        if int(tokens[row, position]) != tokenizer.convert_tokens_to_ids(subject):
            raise RuntimeError(f"subject {subject!r} is not at token {position} of {text!r}; is BOS prepended?")
        if position > 0:
            mask[row, position - 1] = False
    return mask


def _training_sentences(world: SyntheticWorld, role: Role, forget_topic: Topic) -> tuple[list[str], list[str], Tensor]:
    """Training sentences of ``role``, the entity name in each, and whether each is a forget sentence."""
    topics: list[Topic] = [topic for topic in TOPICS if not (role == "twin" and topic == forget_topic)]
    texts = list(world.sentences(topics))
    facts = world.facts_of(*topics)
    subjects = [str(fact.subject) for fact in facts for _ in train_prompts(fact)]
    flags = torch.tensor([world.topic_of(fact) == forget_topic for fact in facts for _ in train_prompts(fact)])
    if len(subjects) != len(texts) or len(flags) != len(texts):
        raise RuntimeError("SyntheticWorld.sentences must give two sentences per fact, in fact order")
    return texts, subjects, flags


def _initial_model(world: SyntheticWorld, seed: int, config: OrganismConfig) -> HookedTransformer:
    return tiny_model(
        world.tokenizer(),
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_mlp=config.d_mlp,
        n_ctx=config.n_ctx,
        seed=seed,
    )


def _cache_settings(world: SyntheticWorld, role: Role, seed: int, config: OrganismConfig) -> dict[str, Any]:
    """Everything that determines a model's weights; its hash names the cache entry."""
    training = dataclasses.asdict(config)
    training.pop("neighbour_topic")  # the neighbour only changes which facts the domain reports
    if role != "planted":
        for field in ("planted_layers", "planted_per_layer", "planted_off_fraction"):
            training.pop(field)
    else:
        training["planted_layers"] = list(config.planted_layers)
    world_facts = [fact.to_dict() for fact in world.facts]
    return {
        "recipe": RECIPE_VERSION,
        "role": role,
        "seed": seed,
        "config": training,
        "world": settings_key({"facts": world_facts}),
    }


def _save(model: HookedTransformer, report: TrainingReport, settings: dict[str, Any], folder: Path) -> None:
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(folder / _MODEL_FILE))
    record = {"settings": settings, "report": dataclasses.asdict(report)}
    (folder / _CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _load(
    folder: Path, world: SyntheticWorld, settings: dict[str, Any], config: OrganismConfig, seed: int
) -> tuple[HookedTransformer, TrainingReport]:
    """Read a verified cache entry; raise CacheCorruptError when it does not match ``settings`` or the model."""
    try:
        record = json.loads((folder / _CONFIG_FILE).read_text(encoding="utf-8"))
        report = TrainingReport(**{**record["report"], "from_cache": True})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheCorruptError(f"cache entry {folder}: unreadable {_CONFIG_FILE}: {error}") from error
    if record.get("settings") != json.loads(json.dumps(settings)):
        raise CacheCorruptError(f"cache entry {folder}: its settings differ from the requested ones")
    model = _initial_model(world, seed, config)
    try:
        tensors = safetensors.torch.load_file(str(folder / _MODEL_FILE))
        model.load_state_dict(tensors, strict=True)
    except Exception as error:  # safetensors and load_state_dict raise several error types
        raise CacheCorruptError(f"cache entry {folder}: {_MODEL_FILE} does not fit the model: {error}") from error
    model.eval()
    return model, report


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, restoring the caller's thread count after it."""
    # Float sums split over threads depend on the thread count, so with one thread the number of cores cannot
    # change the weights. Models this small gain little from a second thread, and on a shared 2-core machine two
    # threads made training about 6 times slower than one (179 s against 29 s for the organism).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
