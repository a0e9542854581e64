"""Residual streams at the answer position, and the logit lens: what each layer would predict if it were the last.

The logit lens (nostalgebraist, 2020, "interpreting GPT: the logit lens") decodes the residual stream after each
layer with the model's own final normalization and unembedding. An edit that removes an answer early (in the
layers that recall it) leaves the target's rank low at every later layer. An edit that only suppresses it late
(a last-layer correction) shows the target ranked high in the middle layers and pushed down at the end: the
knowledge is still computed, then hidden.

Layers are numbered by residual stream: 0 is the embedding (``blocks.0.hook_resid_pre``), ``L + 1`` the stream
after block ``L`` (``blocks.L.hook_resid_post``), so the last one decodes to the model's own logits.

Warning:
    Only each choice's first token is read, at the last prompt position. Facts whose choices share a first token
    are dropped (:func:`first_token_choices`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import make_batch, tokenize_completion
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
    normalized = model.ln_final(flat) if hasattr(model, "ln_final") else flat
    logits = model.unembed(normalized)
    return logits.reshape(*shape[:-1], logits.shape[-1]).float().cpu()


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
) -> LensResult:
    """Decode the residual stream after every layer at the last prompt position and rank each fact's target.

    Args:
        model: Any HookedTransformer with a tokenizer.
        facts: Facts to read; those with clashing first tokens are dropped.
        batch_size: Facts per forward pass.
        residuals: Residual streams of exactly the kept facts, from :func:`last_position_residuals`, to skip
            recomputing them.
        label: Name of the model in progress bars.
    """
    kept, choice_tokens = first_token_choices(model, facts)
    if residuals is None:
        residuals = last_position_residuals(
            model, kept, batch_size=batch_size, description=f"logit lens residuals ({label})"
        )
    if residuals.shape[1] != len(kept):
        raise ValueError(f"residuals hold {residuals.shape[1]} facts but {len(kept)} facts have distinct choices")
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
