"""Small builders shared by the tests: a word-level vocabulary, tiny models and a toy domain."""

from __future__ import annotations

from excise.data.facts import Domain, Fact
from excise.models.tiny import tiny_model, vocabulary_of, word_tokenizer

SYMBOLS = {
    "gold": "Au",
    "silver": "Ag",
    "iron": "Fe",
    "copper": "Cu",
    "lead": "Pb",
    "tin": "Sn",
    "zinc": "Zn",
    "nickel": "Ni",
}
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima"}
COLOURS = {"grass": "green", "sky": "blue", "snow": "white", "coal": "black"}


def _facts(table: dict[str, str], template: str, paraphrase: str, relation: str) -> tuple[Fact, ...]:
    values = list(table.values())
    facts = []
    for subject, value in table.items():
        distractors = tuple(f" {v}" for v in values if v != value)[:3]
        facts.append(
            Fact(
                id=f"{relation}-{subject}",
                prompt=template.format(subject),
                target=f" {value}",
                distractors=distractors,
                paraphrases=(paraphrase.format(subject),),
                subject=subject,
                relation=relation,
            )
        )
    return tuple(facts)


def toy_domain() -> Domain:
    """Element symbols to forget, colours as neighbours, capitals to retain."""
    return Domain(
        name="toy",
        forget=_facts(SYMBOLS, "the symbol of {} is", "{} has the symbol", "symbol"),
        neighbour=_facts(COLOURS, "the colour of {} is", "{} has the colour", "colour"),
        retain=_facts(CAPITALS, "the capital of {} is", "{} has the capital", "capital"),
    )


def toy_tokenizer():
    domain = toy_domain()
    texts = [f.prompt + f.target for f in domain.all_facts()]
    texts += [p for f in domain.all_facts() for p in f.paraphrases]
    texts += [d for f in domain.all_facts() for d in f.distractors]
    return word_tokenizer(vocabulary_of(texts))


def toy_model(**overrides):
    """A 2-layer llama-shaped model (RMSNorm, rotary, gated MLP, grouped-query attention) over the toy vocabulary."""
    settings = dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=64,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        seed=0,
    )
    settings.update(overrides)
    return tiny_model(toy_tokenizer(), **settings)
