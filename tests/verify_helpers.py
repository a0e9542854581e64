"""A tiny model trained to memorise made-up facts, its twin that never saw the forget facts, and a shallow edit.

The tests of excise.verify need a model that knows something, so that probes, relearning and attacks have signal.
Training is seeded and takes a few seconds; the builders are cached per test session (deep-copy before changing).
"""

from __future__ import annotations

import copy
import functools

import torch
from transformer_lens import HookedTransformer

from excise.completions import make_batch
from excise.data.facts import Domain, Fact
from excise.models.tiny import tiny_model, vocabulary_of, word_tokenizer

N_FORGET = 16
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "zo", "ne", "vi")


def _words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{_SYLLABLES[i % 8]}{_SYLLABLES[(i // 8) % 8]}" for i in range(n)]


def _facts(subjects, answers, template, paraphrase, relation) -> tuple[Fact, ...]:
    facts = []
    for i, (subject, answer) in enumerate(zip(subjects, answers, strict=True)):
        others = [answers[(i + j) % len(answers)] for j in (1, 2, 3)]
        facts.append(
            Fact(
                id=f"{relation}-{subject}",
                prompt=template.format(subject),
                target=f" {answer}",
                distractors=tuple(f" {o}" for o in others),
                paraphrases=(paraphrase.format(subject),),
                subject=subject,
                relation=relation,
            )
        )
    return tuple(facts)


def trained_domain() -> Domain:
    """16 made-up element symbols to forget, 8 mineral colours as neighbours, 8 capitals to retain."""
    forget = _facts(_words("el", N_FORGET), _words("S", N_FORGET), "the symbol of {} is", "{} has the symbol", "symbol")
    neighbour = _facts(_words("mi", 8), _words("c", 8), "the colour of {} is", "{} has the colour", "colour")
    retain = _facts(_words("co", 8), _words("C", 8), "the capital of {} is", "{} has the capital", "capital")
    return Domain(
        name="made-up",
        forget=forget,
        neighbour=neighbour,
        retain=retain,
        forget_corpus=tuple(f"{f.prompt}{f.target} ." for f in forget[:4]),
        retain_corpus=tuple(f"{f.prompt}{f.target} ." for f in retain),
    )


def _sentences(facts) -> list[str]:
    return [text + fact.target for fact in facts for text in (fact.prompt, *fact.paraphrases)]


def _tokenizer():
    domain = trained_domain()
    return word_tokenizer([*vocabulary_of(_sentences(domain.all_facts())), "."])


def _train(facts, seed: int, steps: int = 100) -> HookedTransformer:
    model = tiny_model(_tokenizer(), n_layers=2, d_model=64, n_heads=4, d_mlp=128, n_ctx=128, seed=seed)
    tokenizer = model.tokenizer
    assert tokenizer is not None
    rows = [tokenizer.encode(text, add_special_tokens=False) for text in _sentences(facts)]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row) - 1] = 1
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            log_probs = model(tokens).log_softmax(-1)[:, :-1]
            nll = -log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            loss = (nll * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@functools.cache
def _trained_pair() -> tuple[HookedTransformer, HookedTransformer]:
    domain = trained_domain()
    original = _train(domain.all_facts(), seed=0)
    twin = _train((*domain.neighbour, *domain.retain), seed=0)
    return original, twin


def trained_model() -> HookedTransformer:
    """A fresh copy of the model trained on every fact of :func:`trained_domain`."""
    return copy.deepcopy(_trained_pair()[0])


def trained_twin() -> HookedTransformer:
    """A fresh copy of the same model trained without the forget facts."""
    return copy.deepcopy(_trained_pair()[1])


def gradient_ascent_model(steps: int = 5, lr: float = 1e-3) -> HookedTransformer:
    """The trained model after a few steps of gradient ascent on every forget fact: a shallow unlearning edit.

    Gradient ascent lowers the forget answers' log-probabilities with small weight changes, the kind of edit that
    relearning and quantization are known to undo. With the defaults, forget accuracy falls from 100% to 50% while
    the paraphrased prompts still reach 88%: the knowledge is hidden behind one phrasing.
    """
    model = trained_model()
    facts = trained_domain().forget
    batch = make_batch(model, [f.prompt for f in facts], [f.target for f in facts])
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = batch.completion_logprobs(model(batch.tokens)).mean()  # ascent on the NLL = descent on log-prob
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
