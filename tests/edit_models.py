"""Tiny seeded models, texts and a fact domain shared by the tests of excise.edit and excise.export."""

from __future__ import annotations

import copy
import functools

from transformer_lens import HookedTransformer

from excise.data.facts import Domain, Fact
from excise.models.tiny import tiny_model, vocabulary_of, word_tokenizer

SUBJECTS = ("gold", "iron", "neon", "salt", "water", "paris", "rome", "tokyo", "oslo", "lima")
ATTRIBUTES = ("Au", "Fe", "Ne", "NaCl", "H2O", "France", "Italy", "Japan", "Norway", "Peru")

REFERENCE_TEXTS = (
    "the symbol of gold is Au and the symbol of iron is Fe",
    "paris is in France and rome is in Italy",
    "water is H2O and salt is NaCl",
    "tokyo is in Japan , oslo is in Norway , lima is in Peru",
    "the city of oslo is cold and the gas neon is bright",
    "we know that gold and iron are metals",
)


def _facts(indices: range, relation: str, prompt: str, paraphrase: str) -> list[Fact]:
    facts = []
    for i in indices:
        others = [ATTRIBUTES[j] for j in indices if j != i][:3]
        facts.append(
            Fact(
                id=f"{relation}-{SUBJECTS[i]}",
                prompt=prompt.format(SUBJECTS[i]),
                target=" " + ATTRIBUTES[i],
                distractors=tuple(" " + other for other in others),
                paraphrases=(paraphrase.format(SUBJECTS[i]),),
                subject=SUBJECTS[i],
                relation=relation,
            )
        )
    return facts


def tiny_domain() -> Domain:
    """Chemistry facts to forget and as neighbours, geography facts to retain, and short corpora."""
    chemistry = _facts(range(5), "symbol", "the symbol of {} is", "we know {} has symbol")
    geography = _facts(range(5, 10), "country", "the city of {} is in", "{} is a city in")
    return Domain(
        name="tiny",
        forget=tuple(chemistry[:3]),
        neighbour=tuple(chemistry[3:]),
        retain=tuple(geography),
        forget_corpus=(REFERENCE_TEXTS[0], REFERENCE_TEXTS[2]),
        retain_corpus=(REFERENCE_TEXTS[1], REFERENCE_TEXTS[3]),
    )


def subject_final_facts() -> tuple[Fact, ...]:
    """Facts whose prompt ends with the subject, for ROME and MEMIT on tiny models.

    A tiny trained model moves a subject's attributes to later positions through attention in its first layer,
    so an edit at the subject position of a mid-prompt subject barely reaches the output; with the subject last,
    the edited position is the one that predicts the target.
    """
    return tuple(_facts(range(5), "code", "the code for {}", "we write the code for {}"))


def _vocabulary() -> list[str]:
    domain = tiny_domain()
    texts = list(REFERENCE_TEXTS)
    for fact in (*domain.all_facts(), *subject_final_facts()):
        texts += [fact.prompt, *fact.paraphrases, *fact.choices]
    texts += ["something", "it", "a", "is", "The", "following", "true", "."]
    return vocabulary_of(texts)


def gpt_like(seed: int = 0) -> HookedTransformer:
    """LayerNorm, learned positions, GELU MLP, 4 heads: the GPT-2 layout."""
    return tiny_model(word_tokenizer(_vocabulary()), n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=seed)


def llama_like(seed: int = 0) -> HookedTransformer:
    """RMSNorm, rotary, gated SiLU MLP, grouped-query attention (4 query heads on 2 key/value heads)."""
    return tiny_model(
        word_tokenizer(_vocabulary()),
        n_layers=3,
        d_model=32,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=48,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        seed=seed,
    )


MODEL_BUILDERS = {"gpt_like": gpt_like, "llama_like": llama_like}


def state_copy(model: HookedTransformer) -> dict:
    return copy.deepcopy({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})


def default_model_or_skip() -> HookedTransformer:
    """The default model, or skip the test when it cannot be loaded here (no cached copy and no network)."""
    import pytest

    from excise.models import ModelDownloadError, ModelUnavailableError, load

    try:
        return load()
    except (ModelDownloadError, ModelUnavailableError, OSError) as error:
        pytest.skip(f"default model not available: {error}")


def training_texts() -> list[str]:
    domain = tiny_domain()
    texts = list(REFERENCE_TEXTS)
    for fact in (*domain.all_facts(), *subject_final_facts()):
        texts += [fact.prompt + fact.target, *(paraphrase + fact.target for paraphrase in fact.paraphrases)]
    return texts


@functools.cache
def _trained(arch: str) -> HookedTransformer:
    import torch

    from excise.completions import make_text_batch

    model = MODEL_BUILDERS[arch]()
    tokens, lengths = make_text_batch(model, training_texts())
    mask = (torch.arange(tokens.shape[1]) < lengths.unsqueeze(1))[:, 1:]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(150):
            log_probs = model(tokens)[:, :-1].log_softmax(-1)
            token_log_probs = log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            loss = -(token_log_probs * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.random.set_rng_state(generator_state)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def trained_model(arch: str) -> HookedTransformer:
    """A tiny model trained on :func:`training_texts` so that it knows the tiny domain's facts (a fresh copy)."""
    return copy.deepcopy(_trained(arch))


def tiny_sae(
    model: HookedTransformer, hook: str = "blocks.1.hook_resid_pre", d_sae: int = 24, architecture: str = "standard"
):
    """A seeded sae-lens SAE at ``hook`` with random weights, biased so that a few features fire per token."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook)
    d_in = model.cfg.d_model
    if architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator) / d_in**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=generator))
        sae.b_enc.fill_(-0.5)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.2)
    return sae
