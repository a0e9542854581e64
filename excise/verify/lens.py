"""Residual streams at the answer position, and the logit lens: what each layer would predict if it were the last.

The logit lens (nostalgebraist, 2020, "interpreting GPT: the logit lens") decodes the residual stream after each
layer with the model's own final normalization and unembedding. An edit that removes an answer early (in the
layers that recall it) leaves the target's rank low at every later layer. An edit that only suppresses it late
(a last-layer correction) shows the target ranked high in the middle layers and pushed down at the end: the
knowledge is still computed, then hidden.

Layers are numbered by residual stream: 0 is the embedding (``blocks.0.hook_resid_pre``), ``L + 1`` the stream
after block ``L`` (``blocks.L.hook_resid_post``), so the last one decodes to the model's own logits.

The tuned lens (Belrose et al., 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens")
first maps each stream through an affine translator trained so that the decoded stream matches the model's own
final next-token distribution on generic text (:func:`fit_tuned_lens`). Middle layers decode poorly through the
final unembedding alone, so the logit lens can miss a target that a stream still encodes; the tuned lens is the
stronger reader. Pass a fitted lens to :func:`logit_lens`.

Warning:
    Only each choice's first token is read, at the last prompt position. Facts whose choices share a first token
    are dropped (:func:`first_token_choices`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import make_batch, make_text_batch, tokenize_completion, unembed_residual
from excise.data.facts import Fact


def residual_hooks(model: HookedTransformer) -> list[str]:
    """The embedding stream and the stream after every block, in order."""
    return ["blocks.0.hook_resid_pre", *[f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]]


def first_token_choices(model: HookedTransformer, facts: Sequence[Fact]) -> tuple[list[Fact], list[list[int]]]:
    """Keep the facts whose choices have distinct first tokens; return them and those tokens (target first)."""
    kept, tokens = [], []
    for fact in facts:
        firsts = [tokenize_completion(model, choice)[0] for choice in fact.choices]
        if len(set(firsts)) == len(firsts):
            kept.append(fact)
            tokens.append(firsts)
    return kept, tokens


@torch.no_grad()
def last_position_residuals(
    model: HookedTransformer, facts: Sequence[Fact], *, batch_size: int = 16, description: str = "residual streams"
) -> Float[Tensor, "layer fact d_model"]:
    """Residual stream at each fact's last prompt position, for every stream of :func:`residual_hooks` (on CPU)."""
    hooks = residual_hooks(model)
    if not facts:
        return torch.zeros(len(hooks), 0, model.cfg.d_model)
    parts = []
    n_batches = -(-len(facts) // batch_size)
    for start in tqdm(range(0, len(facts), batch_size), desc=description, leave=False, disable=n_batches < 2):
        chunk = facts[start : start + batch_size]
        batch = make_batch(model, [f.prompt for f in chunk], [f.target for f in chunk])
        _, cache = model.run_with_cache(batch.tokens, names_filter=lambda name: name in hooks)
        rows = torch.arange(len(chunk), device=batch.tokens.device)
        positions = batch.last_prompt_positions
        parts.append(torch.stack([cache[hook][rows, positions] for hook in hooks]).float().cpu())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def decode_residual(model: HookedTransformer, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Apply the model's final normalization and unembedding to residual-stream vectors."""
    shape = residual.shape
    flat = residual.reshape(-1, 1, shape[-1]).to(model.cfg.device, model.cfg.dtype)
    logits = unembed_residual(model, flat)
    return logits.reshape(*shape[:-1], logits.shape[-1]).float().cpu()


@dataclasses.dataclass(frozen=True)
class TunedLensSettings:
    """Settings for fitting a tuned lens.

    Attributes:
        n_texts: Generic texts read (the first ones).
        max_tokens: Tokens kept per text. The first token of each text is left out: it is where many models park
            an attention sink, so its next-token prediction is uninformative.
        steps: Adam steps. Every step decodes ``batch_tokens`` positions through the full vocabulary once per
            stream, so on a 135M-parameter model each step costs about as much as a forward pass over
            ``n_streams * batch_tokens`` tokens.
        batch_tokens: Token positions per step.
        learning_rate: Adam learning rate.
        held_out: Share of the positions kept out of training, to measure the fit.
        seed: Seed of the held-out split and the batch order.
    """

    n_texts: int = 64
    max_tokens: int = 64
    steps: int = 100
    batch_tokens: int = 64
    learning_rate: float = 1e-3
    held_out: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_texts", "steps", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TunedLensSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 2:
            raise ValueError(f"TunedLensSettings.max_tokens must be >= 2, got {self.max_tokens}")
        if not self.learning_rate > 0:
            raise ValueError(f"TunedLensSettings.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"TunedLensSettings.held_out must be in (0, 1), got {self.held_out}")


@dataclasses.dataclass(frozen=True)
class TunedLens:
    """Affine translators, one per residual stream of :func:`residual_hooks`: ``h -> h + h @ weight + bias``.

    The last stream's translator is the identity, since it already decodes to the model's logits.

    Attributes:
        weights: ``(n_streams, d_model, d_model)``; zero is the logit lens.
        biases: ``(n_streams, d_model)``.
        kl_logit_lens: Per stream, the mean KL divergence (nats) from the model's final distribution to the
            logit lens's, on held-out positions.
        kl_tuned_lens: The same for the tuned lens after fitting.
        n_tokens: Positions trained on.
    """

    weights: Tensor
    biases: Tensor
    kl_logit_lens: list[float]
    kl_tuned_lens: list[float]
    n_tokens: int

    def translate(self, residuals: Float[Tensor, "layer n d_model"]) -> Float[Tensor, "layer n d_model"]:
        """Map each stream's vectors through its translator."""
        if residuals.shape[0] != self.weights.shape[0]:
            raise ValueError(
                f"residuals have {residuals.shape[0]} streams but the lens has {self.weights.shape[0]}; fit the "
                "lens on the same model"
            )
        residuals = residuals.float()
        return residuals + torch.einsum("lnd,lde->lne", residuals, self.weights) + self.biases.unsqueeze(1)


def fit_tuned_lens(
    model: HookedTransformer, texts: Sequence[str], settings: TunedLensSettings = TunedLensSettings()
) -> TunedLens:
    """Fit a :class:`TunedLens` for ``model`` on generic ``texts`` by minimising KL to its final distribution.

    Translators start at zero (the logit lens) and are trained jointly with Adam. The model is not changed.
    """
    hooks = residual_hooks(model)
    texts = [text for text in texts[: settings.n_texts] if text.strip()]
    if not texts:
        raise ValueError("fit_tuned_lens needs generic texts; pass at least one non-empty text")
    streams = []
    with torch.no_grad():
        for start in range(0, len(texts), 8):
            tokens, lengths = make_text_batch(model, texts[start : start + 8], settings.max_tokens)
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
            positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
            keep = (positions >= 1) & (positions < lengths.unsqueeze(1))
            streams.append(torch.stack([cache[hook][keep] for hook in hooks]).float().cpu())
    residuals = torch.cat(streams, dim=1)
    n = residuals.shape[1]
    if n < 2:
        raise ValueError("the texts give fewer than 2 positions after the first token; pass longer texts")
    order = list(range(n))
    random.Random(settings.seed).shuffle(order)
    n_held = max(1, round(settings.held_out * n))
    held_out, train = order[:n_held], order[n_held:] or order[:n_held]

    n_streams, d_model = residuals.shape[0], residuals.shape[2]
    weights = torch.zeros(n_streams - 1, d_model, d_model, requires_grad=True)
    biases = torch.zeros(n_streams - 1, d_model, requires_grad=True)
    optimizer = torch.optim.Adam([weights, biases], lr=settings.learning_rate)
    generator = random.Random(settings.seed + 1)
    flags = [parameter.requires_grad for parameter in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with torch.no_grad():
            before = _lens_kl(model, residuals[:, held_out], None, None, range(n_streams))
        # The last stream decodes to the model's own logits, so only the others are trained.
        trained = range(n_streams - 1)
        for _ in tqdm(range(settings.steps), desc="tuned lens", leave=False):
            index = torch.tensor(generator.sample(train, min(settings.batch_tokens, len(train))))
            with torch.enable_grad():
                loss = torch.stack(_lens_kl(model, residuals[:, index], weights, biases, trained)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = _lens_kl(model, residuals[:, held_out], weights, biases, range(n_streams))
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
    zero = torch.zeros(1, d_model, d_model)
    return TunedLens(
        weights=torch.cat([weights.detach(), zero]),
        biases=torch.cat([biases.detach(), torch.zeros(1, d_model)]),
        kl_logit_lens=[float(value) for value in before],
        kl_tuned_lens=[float(value) for value in after],
        n_tokens=len(train),
    )


def _lens_kl(
    model: HookedTransformer,
    residuals: Float[Tensor, "layer n d_model"],
    weights: Tensor | None,
    biases: Tensor | None,
    streams: Sequence[int],
) -> list[Tensor]:
    """Return, per stream in ``streams``, the mean KL divergence from the decoded last stream to that stream.

    With ``weights`` and ``biases`` each stream goes through its translator first; without them this is the
    logit lens.
    """
    target = _decode_rows(model, residuals[-1]).log_softmax(-1).detach()
    values = []
    for layer in streams:
        stream = residuals[layer].to(model.cfg.device, model.cfg.dtype)
        if weights is not None and biases is not None and layer < weights.shape[0]:
            stream = stream + stream @ weights[layer].to(stream) + biases[layer].to(stream)
        log_q = _decode_rows(model, stream).log_softmax(-1)
        values.append((target.exp() * (target - log_q)).sum(-1).mean())
    return values


def _decode_rows(model: HookedTransformer, rows: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    rows = rows.to(model.cfg.device, model.cfg.dtype).unsqueeze(1)
    return unembed_residual(model, rows).squeeze(1).float()


@dataclasses.dataclass(frozen=True)
class LensResult:
    """Per residual stream (layer 0 = embedding), how the decoded stream ranks each fact's target.

    Attributes:
        layers: Residual stream numbers.
        mean_logprob: Mean log-probability (nats) of the target's first token.
        median_rank: Median rank of that token in the whole vocabulary (0 = top).
        top10: Fraction of facts whose target is among the 10 most likely tokens.
        choice_accuracy: Fraction of facts whose target beats every distractor (first tokens only).
        n_facts: Facts measured.
    """

    layers: list[int]
    mean_logprob: list[float]
    median_rank: list[float]
    top10: list[float]
    choice_accuracy: list[float]
    n_facts: int

    @property
    def best_choice_accuracy(self) -> float:
        """Highest choice accuracy over all layers."""
        return max(self.choice_accuracy) if self.choice_accuracy else float("nan")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def logit_lens(
    model: HookedTransformer,
    facts: Sequence[Fact],
    *,
    batch_size: int = 16,
    residuals: Float[Tensor, "layer fact d_model"] | None = None,
    label: str = "model",
    lens: TunedLens | None = None,
) -> LensResult:
    """Decode the residual stream after every layer at the last prompt position and rank each fact's target.

    Args:
        model: Any HookedTransformer with a tokenizer.
        facts: Facts to read; those with clashing first tokens are dropped.
        batch_size: Facts per forward pass.
        residuals: Residual streams of exactly the kept facts, from :func:`last_position_residuals`, to skip
            recomputing them.
        label: Name of the model in progress bars.
        lens: A tuned lens fitted on this model (:func:`fit_tuned_lens`); None decodes the streams directly.
    """
    kept, choice_tokens = first_token_choices(model, facts)
    if residuals is None:
        residuals = last_position_residuals(
            model, kept, batch_size=batch_size, description=f"logit lens residuals ({label})"
        )
    if residuals.shape[1] != len(kept):
        raise ValueError(f"residuals hold {residuals.shape[1]} facts but {len(kept)} facts have distinct choices")
    if lens is not None and kept:
        residuals = lens.translate(residuals)
    targets = torch.tensor([tokens[0] for tokens in choice_tokens], dtype=torch.long)
    result = LensResult([], [], [], [], [], len(kept))
    for layer in range(residuals.shape[0]):
        if not kept:
            break
        log_probs = decode_residual(model, residuals[layer]).log_softmax(-1)
        target_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ranks = (log_probs > target_lp.unsqueeze(-1)).sum(-1).numpy()
        correct = [_beats_distractors(log_probs[row], tokens) for row, tokens in enumerate(choice_tokens)]
        result.layers.append(layer)
        result.mean_logprob.append(float(target_lp.mean()))
        result.median_rank.append(float(np.median(ranks)))
        result.top10.append(float((ranks < 10).mean()))
        result.choice_accuracy.append(float(np.mean(correct)))
    return result


def _beats_distractors(log_probs: Float[Tensor, " d_vocab"], tokens: Sequence[int]) -> bool:
    index: Int[Tensor, " choice"] = torch.tensor(tokens, dtype=torch.long)
    values = log_probs[index]
    return bool((values[1:] < values[0]).all())
