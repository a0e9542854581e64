"""Tiny HookedTransformers with word-level tokenizers, for tests and the model organism.

A word-level tokenizer splits on white space, so ``" Au"`` and ``"Au"`` are the same token and a fact's target
tokenizes the same whether or not it follows its prompt. That keeps tiny synthetic models free of BPE pitfalls.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<pad>", "<eos>")


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a white-space tokenizer over ``words``; ids 0-2 are ``<unk>``, ``<pad>`` and ``<eos>``.

    Words are deduplicated in first-seen order, so the same word list always gives the same ids.
    """
    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not word or any(character.isspace() for character in word):
            raise ValueError(f"a vocabulary word must be non-empty and contain no white space, got {word!r}")
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # type: ignore[assignment]
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def vocabulary_of(texts: Iterable[str]) -> list[str]:
    """List the white-space separated words of ``texts`` in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in text.split():
            seen.setdefault(word, None)
    return list(seen)


def tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_key_value_heads: int | None = None,
    d_mlp: int | None = None,
    n_ctx: int = 64,
    act_fn: str = "gelu",
    gated_mlp: bool = False,
    normalization_type: str = "LN",
    positional_embedding_type: str = "standard",
    seed: int = 0,
) -> HookedTransformer:
    """Build a randomly initialised HookedTransformer whose vocabulary is ``tokenizer``'s.

    ``n_key_value_heads`` below ``n_heads`` gives grouped-query attention, as in the default model, so that code
    indexing heads can be tested on both layouts. The same seed always gives the same weights.
    """
    if d_model % n_heads != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if n_key_value_heads is not None and n_heads % n_key_value_heads != 0:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_key_value_heads ({n_key_value_heads})")
    # HookedTransformerConfig seeds torch, random and numpy globally when given a seed; building a model must not
    # change the caller's random streams, so all three are saved here and restored below.
    torch_state = torch.random.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    config = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp if d_mlp is not None else 4 * d_model,
        d_vocab=len(tokenizer),
        n_ctx=n_ctx,
        act_fn=act_fn,
        gated_mlp=gated_mlp,
        normalization_type=normalization_type,
        positional_embedding_type=positional_embedding_type,
        n_key_value_heads=n_key_value_heads,
        default_prepend_bos=False,
        seed=seed,
        device="cpu",
    )
    try:
        torch.manual_seed(seed)
        # TransformerLens sets missing special tokens on the tokenizer it is given, so it gets a copy.
        model = HookedTransformer(config, tokenizer=copy.deepcopy(tokenizer))
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    model.eval()
    return model
