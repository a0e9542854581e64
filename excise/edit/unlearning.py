"""Unlearning baselines by fine-tuning: gradient ascent, gradient difference, NPO and RMU.

All four train a copy of the model on a :class:`~excise.data.facts.Domain` and return the change of the trained
weights as a :class:`~excise.edit.weights.WeightDelta` (weight form only), so the result saves, loads, composes
and exports like every other edit. The caller's model is never changed.

- **Gradient ascent** (Jang et al., 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models"):
  maximise the loss on forget examples. Nothing keeps the rest of the model in place, so it degrades quickly.
- **Gradient difference** (Liu et al., 2022, "Continual Learning and Private Unlearning"; as in the TOFU
  benchmark): gradient ascent on forget examples plus ordinary training on retain examples.
- **NPO** (Zhang et al., 2024, "Negative Preference Optimization"): the forget loss
  ``(2 / beta) * softplus(beta * (log p(y|x) - log p_ref(y|x)))`` with ``p_ref`` the original model. It behaves
  like gradient ascent while the model still prefers ``y`` and saturates once ``p`` falls below ``p_ref``, which
  slows the collapse. Here with a retain loss (NPO+RT) unless ``retain_weight=0``.
- **RMU** (Li et al., 2024, "The WMDP Benchmark"): at one layer, push the residual stream of forget text towards a
  fixed random direction scaled by ``c``, and keep that of retain text where the original model had it, updating
  only ``W_out`` of that layer and the two before it.

Forget examples are the domain's forget facts (prompt and target, loss on the target) and, with
``forget_data="both"``, its forget corpus. Retain examples are the domain's retain corpus when it has one, else
its retain facts, so that retain accuracy is not measured on the training examples by default. Neighbour facts are
never trained on. Texts count as examples whose completion is everything after the first word.

Defaults are set for the default model (SmolLM2-135M-Instruct, float32, CPU) on the bundled chemistry domain; see
:data:`DEFAULTS`. They are a starting point, not tuned optima: look at forget, neighbour and retain accuracy
together.

Warning:
    RMU's steering coefficient is absolute in the paper (6.5 for Zephyr-7B); here ``steering_scale`` multiplies
    the mean norm of the forget residual stream at the chosen layer, so that one default fits models whose
    residual norms differ.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import CompletionBatch, make_batch
from excise.data.facts import Domain
from excise.edit.base import model_signature
from excise.edit.rome import default_layer
from excise.edit.weights import WeightDelta

logger = logging.getLogger(__name__)

UnlearnMethod = Literal["gradient_ascent", "gradient_difference", "npo", "rmu"]
UNLEARN_METHODS: tuple[UnlearnMethod, ...] = get_args(UnlearnMethod)
ForgetData = Literal["facts", "corpus", "both"]
FORGET_DATA: tuple[ForgetData, ...] = get_args(ForgetData)

Example = tuple[str, str]  # (prompt, completion)


@dataclasses.dataclass(frozen=True)
class UnlearnSettings:
    """Settings of one unlearning run.

    Attributes:
        method: Which baseline.
        steps: Optimiser steps.
        learning_rate: AdamW learning rate.
        batch_size: Forget examples per step (and as many retain examples).
        layers: Layers whose parameters train; None for the method's default (all layers, or for RMU the
            steering layer and the two before it).
        parameters: Parameter names inside a block that train, e.g. ``("mlp.W_out",)``; None for the method's
            default (``mlp.W_in``, ``mlp.W_gate`` where present, ``mlp.W_out``; RMU: ``mlp.W_out``).
        retain_weight: Weight of the retain loss (gradient difference, NPO, RMU's ``alpha``).
        beta: NPO's inverse temperature.
        steering_layer: RMU's layer; None for :func:`excise.edit.rome.default_layer`.
        steering_scale: RMU's ``c`` as a multiple of the mean forget residual norm at ``steering_layer``.
        forget_data: Forget examples from ``"facts"``, ``"corpus"`` or ``"both"`` (RMU uses text, so its
            default is ``"both"``).
        max_words: Corpus texts are cut to this many words.
        max_grad_norm: Gradient clipping norm.
        seed: Seed of the example order and of RMU's random direction.
    """

    method: UnlearnMethod
    steps: int = 40
    learning_rate: float = 1e-5
    batch_size: int = 8
    layers: tuple[int, ...] | None = None
    parameters: tuple[str, ...] | None = None
    retain_weight: float = 1.0
    beta: float = 0.1
    steering_layer: int | None = None
    steering_scale: float = 4.0
    forget_data: ForgetData = "facts"
    max_words: int = 48
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in UNLEARN_METHODS:
            raise ValueError(f"UnlearnSettings.method must be one of {UNLEARN_METHODS}, got {self.method!r}")
        if self.forget_data not in FORGET_DATA:
            raise ValueError(f"UnlearnSettings.forget_data must be one of {FORGET_DATA}, got {self.forget_data!r}")
        for name in ("steps", "batch_size", "max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"UnlearnSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "beta", "steering_scale", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UnlearnSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.retain_weight < 0:
            raise ValueError(f"UnlearnSettings.retain_weight must be >= 0, got {self.retain_weight}")


DEFAULTS: dict[UnlearnMethod, UnlearnSettings] = {
    "gradient_ascent": UnlearnSettings("gradient_ascent", steps=20, learning_rate=1e-5),
    "gradient_difference": UnlearnSettings("gradient_difference", steps=40, learning_rate=1e-5),
    "npo": UnlearnSettings("npo", steps=40, learning_rate=2e-5),
    "rmu": UnlearnSettings(
        "rmu", steps=40, learning_rate=5e-4, retain_weight=100.0, forget_data="both", steering_scale=4.0
    ),
}
"""Default settings per method for the default model on the bundled chemistry domain.

RMU's learning rate comes from a search on 24 known facts per set (forget / neighbour / retain accuracy, change of
generic-text perplexity; 40 steps unless stated): 5e-5 gives 1.00 / 0.96 / 1.00 (-0.02), 5e-4 gives
0.71 / 0.83 / 1.00 (+0.19), 1e-3 gives 0.50 / 0.58 / 0.96 (+2.8), and 1e-3 for 80 steps or with twice the
steering scale forgets no more while perplexity rises (+13 and +5.3). RMU removes physics and biology facts along
with chemistry on this model; a higher learning rate removes more of both. See docs/benchmarks-edit.md for the
other methods.
"""


def unlearn(model: HookedTransformer, domain: Domain, settings: UnlearnSettings | UnlearnMethod) -> WeightDelta:
    """Run one unlearning baseline on a copy of ``model`` and return the weight change.

    Args:
        model: The model to unlearn from; it is not changed.
        domain: Forget facts (and corpora) to remove, retain data to keep.
        settings: Full settings, or a method name for :data:`DEFAULTS`.
    """
    if isinstance(settings, str):
        if settings not in DEFAULTS:
            raise ValueError(f"unknown unlearning method {settings!r}; expected one of {UNLEARN_METHODS}")
        settings = DEFAULTS[settings]
    trained_names = _trained_parameters(model, settings)
    forget = _forget_examples(domain, settings)
    retain = _retain_examples(domain, settings)
    working = copy.deepcopy(model)
    for name, parameter in working.named_parameters():
        parameter.requires_grad_(name in trained_names)
    parameters = [working.get_parameter(name) for name in trained_names]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    objective = _objective(model, working, settings, forget)

    generator = random.Random(settings.seed)
    forget_batches = _cycle(forget, settings.batch_size, generator)
    retain_batches = _cycle(retain, settings.batch_size, generator)
    history = []
    with torch.enable_grad():
        for step in tqdm(range(settings.steps), desc=f"unlearning ({settings.method})", leave=False):
            forget_rows = next(forget_batches)
            retain_rows = next(retain_batches)
            loss, parts = objective(working, forget_rows, retain_rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            history.append({"step": step, **parts})
    logger.info("%s finished: %s", settings.method, history[-1] if history else {})

    with torch.no_grad():
        dense = {
            name: (working.get_parameter(name).detach() - model.get_parameter(name).detach()).cpu()
            for name in trained_names
        }
    info: dict[str, Any] = {
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "domain": domain.name,
        "n_forget_examples": len(forget),
        "n_retain_examples": len(retain),
        "history": history,
    }
    return WeightDelta(dense, method=settings.method, info=info, signature=model_signature(model))


def gradient_ascent(model: HookedTransformer, domain: Domain, **overrides: Any) -> WeightDelta:
    """Gradient ascent on the forget examples; ``overrides`` replace fields of the default settings."""
    return unlearn(model, domain, dataclasses.replace(DEFAULTS["gradient_ascent"], **overrides))


def gradient_difference(model: HookedTransformer, domain: Domain, **overrides: Any) -> WeightDelta:
    """Gradient ascent on forget examples plus descent on retain examples."""
    return unlearn(model, domain, dataclasses.replace(DEFAULTS["gradient_difference"], **overrides))


def npo(model: HookedTransformer, domain: Domain, **overrides: Any) -> WeightDelta:
    """Negative preference optimisation with a retain loss (NPO+RT)."""
    return unlearn(model, domain, dataclasses.replace(DEFAULTS["npo"], **overrides))


def rmu(model: HookedTransformer, domain: Domain, **overrides: Any) -> WeightDelta:
    """Representation misdirection: steer forget activations at one layer to a random direction."""
    return unlearn(model, domain, dataclasses.replace(DEFAULTS["rmu"], **overrides))


def _trained_parameters(model: HookedTransformer, settings: UnlearnSettings) -> list[str]:
    if settings.method == "rmu":
        steering = _steering_layer(model, settings)
        layers = settings.layers if settings.layers is not None else tuple(range(max(0, steering - 2), steering + 1))
        names = settings.parameters or ("mlp.W_out",)
    else:
        layers = settings.layers if settings.layers is not None else tuple(range(model.cfg.n_layers))
        names = settings.parameters or (
            ("mlp.W_in", "mlp.W_gate", "mlp.W_out") if model.cfg.gated_mlp else ("mlp.W_in", "mlp.W_out")
        )
    available = dict(model.named_parameters())
    selected = []
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
        for name in names:
            full = f"blocks.{layer}.{name}"
            if full not in available:
                raise ValueError(f"the model has no parameter {full!r}; parameters are named like 'mlp.W_out'")
            selected.append(full)
    return selected


def _steering_layer(model: HookedTransformer, settings: UnlearnSettings) -> int:
    layer = default_layer(model) if settings.steering_layer is None else settings.steering_layer
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"steering_layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
    return layer


def _text_example(text: str, max_words: int) -> Example | None:
    words = text.split()[:max_words]
    if len(words) < 2:
        return None
    return words[0], " " + " ".join(words[1:])


def _forget_examples(domain: Domain, settings: UnlearnSettings) -> list[Example]:
    examples: list[Example] = []
    if settings.forget_data in ("facts", "both"):
        examples += [(fact.prompt, fact.target) for fact in domain.forget]
    if settings.forget_data in ("corpus", "both"):
        texts = [_text_example(text, settings.max_words) for text in domain.forget_corpus]
        examples += [example for example in texts if example is not None]
    if not examples:
        raise ValueError(
            f"domain {domain.name!r} has no forget examples for forget_data={settings.forget_data!r}; "
            "use forget_data='facts' or add a forget corpus"
        )
    return examples


def _retain_examples(domain: Domain, settings: UnlearnSettings) -> list[Example]:
    texts = [_text_example(text, settings.max_words) for text in domain.retain_corpus]
    examples = [example for example in texts if example is not None]
    if not examples:
        logger.info("domain %r has no retain corpus; training the retain loss on its retain facts", domain.name)
        examples = [(fact.prompt, fact.target) for fact in domain.retain]
    needs_retain = settings.method != "gradient_ascent" and settings.retain_weight > 0
    if not examples and needs_retain:
        raise ValueError(
            f"{settings.method} needs retain examples but domain {domain.name!r} has neither a retain corpus nor "
            "retain facts; add some or set retain_weight=0"
        )
    return examples or [("", "")]


def _cycle(examples: Sequence[Example], batch_size: int, generator: random.Random) -> Iterator[list[Example]]:
    """Endless batches from shuffled passes over ``examples``."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < min(batch_size, len(examples)):
            if not order:
                order = list(range(len(examples)))
                generator.shuffle(order)
            batch.append(examples[order.pop()])
        yield batch


def _batch(model: HookedTransformer, rows: Sequence[Example]) -> CompletionBatch:
    return make_batch(model, [prompt for prompt, _ in rows], [completion for _, completion in rows])


def _sequence_logprobs(model: HookedTransformer, rows: Sequence[Example]) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each completion and its token count."""
    batch = _batch(model, rows)
    return batch.completion_logprobs(model(batch.tokens)), batch.completion_lengths


def _objective(
    original: HookedTransformer, working: HookedTransformer, settings: UnlearnSettings, forget: Sequence[Example]
):
    """The loss function of ``settings.method``: ``(model, forget_rows, retain_rows) -> (loss, parts)``."""
    weight = settings.retain_weight

    def retain_nll(model: HookedTransformer, rows: Sequence[Example]) -> Tensor:
        logprobs, lengths = _sequence_logprobs(model, rows)
        return -(logprobs / lengths).mean()

    if settings.method == "gradient_ascent":

        def loss_ga(model, forget_rows, retain_rows):
            logprobs, lengths = _sequence_logprobs(model, forget_rows)
            forget_loss = (logprobs / lengths).mean()  # minimising the log-likelihood = ascending the loss
            return forget_loss, {"forget_logprob": float(forget_loss)}

        return loss_ga

    if settings.method == "gradient_difference":

        def loss_gd(model, forget_rows, retain_rows):
            logprobs, lengths = _sequence_logprobs(model, forget_rows)
            forget_loss = (logprobs / lengths).mean()
            retain_loss = retain_nll(model, retain_rows)
            parts = {"forget_logprob": float(forget_loss), "retain_nll": float(retain_loss)}
            return forget_loss + weight * retain_loss, parts

        return loss_gd

    if settings.method == "npo":
        with torch.no_grad():
            reference = {row: float(_sequence_logprobs(original, [row])[0][0]) for row in dict.fromkeys(forget)}

        def loss_npo(model, forget_rows, retain_rows):
            logprobs, _ = _sequence_logprobs(model, forget_rows)
            ref = torch.tensor([reference[row] for row in forget_rows], device=logprobs.device)
            forget_loss = 2.0 / settings.beta * torch.nn.functional.softplus(settings.beta * (logprobs - ref)).mean()
            parts = {"npo_loss": float(forget_loss), "forget_logprob_change": float((logprobs - ref).mean())}
            if weight == 0:
                return forget_loss, parts
            retain_loss = retain_nll(model, retain_rows)
            return forget_loss + weight * retain_loss, {**parts, "retain_nll": float(retain_loss)}

        return loss_npo

    return _rmu_objective(original, settings, forget)


def _rmu_objective(original: HookedTransformer, settings: UnlearnSettings, forget: Sequence[Example]):
    layer = _steering_layer(original, settings)
    hook = f"blocks.{layer}.hook_resid_post"

    def activations(model: HookedTransformer, rows: Sequence[Example]) -> tuple[Tensor, Tensor]:
        batch = _batch(model, rows)
        _, cache = model.run_with_cache(batch.tokens, names_filter=hook, stop_at_layer=layer + 1)
        positions = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)
        mask = positions < (batch.prompt_lengths + batch.completion_lengths).unsqueeze(1)
        return cache[hook], mask

    with torch.no_grad():
        norms = []
        for start in range(0, len(forget), settings.batch_size):
            acts, mask = activations(original, forget[start : start + settings.batch_size])
            norms.append(acts[mask].float().norm(dim=-1))
        mean_norm = float(torch.cat(norms).mean())
    generator = torch.Generator().manual_seed(settings.seed)
    direction = torch.rand(original.cfg.d_model, generator=generator)  # uniform in [0, 1), as in Li et al. (2024)
    control = (direction / direction.norm() * settings.steering_scale * mean_norm).to(original.cfg.device)

    # run_with_cache detaches cached activations, so the trained model's activations come from a hook instead.
    def live_activations(model: HookedTransformer, rows: Sequence[Example]) -> tuple[Tensor, Tensor]:
        batch = _batch(model, rows)
        store: dict[str, Tensor] = {}

        def keep(activation: Tensor, hook: Any) -> None:
            store["value"] = activation

        model.run_with_hooks(batch.tokens, fwd_hooks=[(hook, keep)], stop_at_layer=layer + 1)
        positions = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)
        mask = positions < (batch.prompt_lengths + batch.completion_lengths).unsqueeze(1)
        return store["value"], mask

    def loss_rmu(model, forget_rows, retain_rows):
        forget_acts, forget_mask = live_activations(model, forget_rows)
        forget_loss = (forget_acts[forget_mask].float() - control).square().mean()
        retain_acts, retain_mask = live_activations(model, retain_rows)
        with torch.no_grad():
            frozen, _ = activations(original, retain_rows)
        retain_loss = (retain_acts[retain_mask].float() - frozen[retain_mask].float()).square().mean()
        parts = {
            "forget_mse": float(forget_loss),
            "retain_mse": float(retain_loss),
            "control_norm": float(control.norm()),
        }
        return forget_loss + settings.retain_weight * retain_loss, parts

    return loss_rmu
