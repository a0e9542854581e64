"""A synthetic knowledge world: made-up entities and attributes, so that what a model knows is known in advance.

Real domains leave open what a model learned and where. A synthetic world fixes the answer: every fact is
generated from a seed, so a model trained from scratch on the world's text knows exactly these facts and nothing
else about its entities, and a twin trained without one topic has never seen that topic's entities at all. This
is the data side of the model organism in :mod:`excise.models.organism`.

The world has four topics of fictional entities, each with two relations:

- ``elements`` (the default forget topic): made-up chemical elements with a symbol and a colour;
- ``minerals`` (the default neighbour topic): made-up minerals with a symbol and a colour, drawn from the same
  symbols and colours as the elements', so the neighbour differs from the forget topic only in its entities;
- ``people``: a birthplace city and a profession;
- ``countries``: a capital city and a river.

Symbols are unique within a topic, capitals and rivers unique among countries. Colours, professions and
birthplaces repeat, and every colour (profession, city) is used once before any repeats. So with at least as
many minerals as elements and at least 8 minerals (8 colours), as by default, every attribute value of the
elements also occurs in the minerals' training sentences, and the only words that a twin trained without the
elements never reads are the element names and a few template words.

Every relation has three cloze templates. Each fact is trained with two of them and the third is held out for
that fact. Which template is held out rotates over the entities of a relation, so every template wording occurs
in training (with other entities) and the held-out prompt asks whether a fact learned from two wordings is
recalled under a third. A template that never occurs in training at all would test whether a tiny model from
scratch understands new English, which it cannot.

Facts follow :class:`~excise.data.facts.Fact` with this layout:

- ``prompt``: the first training template;
- ``paraphrases[0]``: the held-out template, so ``score_facts(..., prompt_of="paraphrase")`` measures recall
  under an unseen wording;
- ``paraphrases[1]``: the second training template;
- ``distractors``: three other values of the same relation, so chance accuracy is 1/4.

All text is word-level: words are separated by single spaces, punctuation is its own word, and every entity name,
symbol and value is one word, so :func:`excise.models.tiny.word_tokenizer` gives each one a single token.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Literal, get_args

from transformers import PreTrainedTokenizerFast

from excise.data.facts import Domain, Fact
from excise.models.tiny import vocabulary_of, word_tokenizer

__all__ = [
    "TOPICS",
    "Entity",
    "PromptKind",
    "Relation",
    "SyntheticWorld",
    "Topic",
    "heldout_prompt",
    "make_world",
    "prompt_variants",
    "train_prompts",
]

Topic = Literal["elements", "minerals", "people", "countries"]
TOPICS: tuple[Topic, ...] = get_args(Topic)
PromptKind = Literal["train", "heldout"]
PROMPT_KINDS: tuple[PromptKind, ...] = get_args(PromptKind)

N_DISTRACTORS = 3
_UNIQUE_RELATIONS = frozenset({"element_symbol", "mineral_symbol", "country_capital", "country_river"})
_SENTENCE_END = " ."

_COLOURS = ("red", "blue", "green", "yellow", "violet", "orange", "grey", "white")
_PROFESSIONS = ("baker", "pilot", "farmer", "painter", "doctor", "sailor", "teacher", "builder")
_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "l", "n", "r", "s", "th", "m")
_NAME_SUFFIXES: dict[str, tuple[str, ...]] = {
    "element": ("ium", "on", "ine"),
    "mineral": ("ite", "ite", "ase"),
    "person": ("", "a", "o"),
    "country": ("ia", "land", "mar"),
    "city": ("burg", "ford", "holm", "ville"),
    "river": ("a", "e", "os"),
}


@dataclasses.dataclass(frozen=True)
class Relation:
    """One kind of fact about the entities of a topic.

    Attributes:
        name: Relation name, used as :attr:`Fact.relation`, e.g. ``"element_symbol"``.
        topic: Topic of the entities the relation describes.
        templates: Three cloze templates with a ``{subject}`` slot; the value follows each template.
    """

    name: str
    topic: Topic
    templates: tuple[str, str, str]

    def render(self, template_index: int, subject: str) -> str:
        return self.templates[template_index].format(subject=subject)


@dataclasses.dataclass(frozen=True)
class Entity:
    """A made-up entity and its attribute values.

    Attributes:
        name: One-word name, e.g. ``"Zorvium"``.
        topic: Topic the entity belongs to.
        attributes: ``(relation name, value)`` pairs, one per relation of the topic.
    """

    name: str
    topic: Topic
    attributes: tuple[tuple[str, str], ...]

    def value(self, relation: str) -> str:
        for name, value in self.attributes:
            if name == relation:
                return value
        raise KeyError(f"entity {self.name!r} has no relation {relation!r}; it has {[n for n, _ in self.attributes]}")


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "element_symbol",
        "elements",
        (
            "The symbol of the element {subject} is",
            "{subject} is written with the symbol",
            "Chemists abbreviate {subject} as",
        ),
    ),
    Relation(
        "element_colour",
        "elements",
        ("The colour of the element {subject} is", "Pure {subject} has the colour", "A sample of {subject} looks"),
    ),
    Relation(
        "mineral_symbol",
        "minerals",
        (
            "The symbol of the mineral {subject} is",
            "{subject} is marked with the symbol",
            "Geologists abbreviate {subject} as",
        ),
    ),
    Relation(
        "mineral_colour",
        "minerals",
        ("The colour of the mineral {subject} is", "Polished {subject} has the colour", "A piece of {subject} looks"),
    ),
    Relation(
        "person_birthplace",
        "people",
        ("{subject} was born in", "The birthplace of {subject} is", "{subject} grew up in the city of"),
    ),
    Relation(
        "person_profession",
        "people",
        ("{subject} works as a", "The job of {subject} is", "By trade {subject} is a"),
    ),
    Relation(
        "country_capital",
        "countries",
        ("The capital of {subject} is", "The government of {subject} sits in", "{subject} is ruled from"),
    ),
    Relation(
        "country_river",
        "countries",
        (
            "The longest river in {subject} is the",
            "{subject} is crossed by the river",
            "The main river of {subject} is the",
        ),
    ),
)
_RELATION_BY_NAME = {relation.name: relation for relation in RELATIONS}


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
    """Entities and facts of a synthetic world; build one with :func:`make_world`.

    Attributes:
        seed: Seed that generated the world; the same seed and sizes always give the same world.
        entities: All entities, topic by topic in :data:`TOPICS` order.
        facts: All facts, in entity order and, per entity, in relation order.
        sizes: Number of entities per topic.
    """

    seed: int
    entities: tuple[Entity, ...]
    facts: tuple[Fact, ...]
    sizes: tuple[tuple[Topic, int], ...]

    @property
    def relations(self) -> tuple[Relation, ...]:
        return RELATIONS

    def topic_of(self, fact: Fact) -> Topic:
        """Return the topic of a fact of this world, from its relation."""
        if fact.relation not in _RELATION_BY_NAME:
            raise KeyError(f"fact {fact.id!r} has relation {fact.relation!r}, which no synthetic topic has")
        return _RELATION_BY_NAME[fact.relation].topic

    def facts_of(self, *topics: Topic) -> tuple[Fact, ...]:
        """Return the facts of the given topics, in world order."""
        _check_topics(topics)
        return tuple(fact for fact in self.facts if self.topic_of(fact) in topics)

    def sentences(self, topics: Sequence[Topic] = TOPICS) -> tuple[str, ...]:
        """Return the training text of ``topics``: every fact in each of its two training templates.

        Sentences come two per fact, in the order of :attr:`facts`, first ``prompt`` then ``paraphrases[1]``. A
        sentence is the prompt, the target and a final ``" ."``, e.g. ``"The capital of Oravia is Kelford ."``.
        """
        _check_topics(topics)
        return tuple(
            prompt + fact.target + _SENTENCE_END
            for fact in self.facts
            if self.topic_of(fact) in topics
            for prompt in train_prompts(fact)
        )

    def domain(self, forget: Topic = "elements", neighbour: Topic = "minerals") -> Domain:
        """Return a Domain: ``forget`` facts, ``neighbour`` facts, and the other topics as retain facts.

        The forget and retain corpora are the training sentences of those topics (:meth:`sentences`).
        """
        _check_topics((forget, neighbour))
        if forget == neighbour:
            raise ValueError(f"forget and neighbour must be different topics, got {forget!r} for both")
        retain: tuple[Topic, ...] = tuple(topic for topic in TOPICS if topic not in (forget, neighbour))
        return Domain(
            name=f"synthetic-{forget}",
            forget=self.facts_of(forget),
            neighbour=self.facts_of(neighbour),
            retain=self.facts_of(*retain),
            forget_corpus=self.sentences((forget,)),
            retain_corpus=self.sentences(retain),
        )

    def vocabulary(self) -> list[str]:
        """Return every word of the world in first-seen order: training text, then held-out prompts and values.

        The vocabulary never depends on which topics a model is trained on, so a twin shares the organism's
        tokenizer.
        """
        texts: list[str] = list(self.sentences())
        for fact in self.facts:
            texts.extend((fact.prompt, *fact.paraphrases, *fact.choices))
        return vocabulary_of(texts)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """Return the word-level tokenizer over :meth:`vocabulary`."""
        return word_tokenizer(self.vocabulary())

    def __repr__(self) -> str:
        sizes = ", ".join(f"{topic}={n}" for topic, n in self.sizes)
        return f"SyntheticWorld(seed={self.seed}, {sizes}, facts={len(self.facts)})"


def make_world(
    seed: int = 0,
    *,
    n_elements: int = 24,
    n_minerals: int = 24,
    n_people: int = 32,
    n_countries: int = 16,
    n_cities: int = 24,
) -> SyntheticWorld:
    """Generate a synthetic world from ``seed``.

    Args:
        seed: Seed of every random choice (names, values, distractors); the same arguments give the same world.
        n_elements: Made-up elements; symbols are unique among elements.
        n_minerals: Made-up minerals; symbols are unique among minerals and drawn from the same symbols as the
            elements' (``max(n_elements, n_minerals)`` of them).
        n_people: People.
        n_countries: Countries, each with a unique capital and a unique river.
        n_cities: Cities; the first ``n_countries`` are the capitals. Birthplaces are drawn from all of them.
    """
    sizes: dict[Topic, int] = {
        "elements": n_elements,
        "minerals": n_minerals,
        "people": n_people,
        "countries": n_countries,
    }
    for topic, n in sizes.items():
        if n < N_DISTRACTORS + 1:
            raise ValueError(
                f"n_{topic} must be at least {N_DISTRACTORS + 1} so that every fact has {N_DISTRACTORS} "
                f"distractors, got {n}"
            )
    if n_cities < n_countries:
        raise ValueError(f"n_cities ({n_cities}) must be >= n_countries ({n_countries}): each capital is a city")

    rng = random.Random(seed)
    names = _NameMaker(rng)
    cities = [names.make("city") for _ in range(n_cities)]
    # Elements and minerals draw their symbols from one pool, so every element symbol is also a mineral's symbol
    # (when n_minerals >= n_elements) and no attribute value occurs only in the elements topic.
    symbols = [names.symbol() for _ in range(max(n_elements, n_minerals))]
    pools: dict[str, list[str]] = {
        "element_symbol": symbols,
        "element_colour": list(_COLOURS),
        "mineral_symbol": symbols,
        "mineral_colour": list(_COLOURS),
        "person_birthplace": cities,
        "person_profession": list(_PROFESSIONS),
        "country_capital": cities[:n_countries],
        "country_river": [names.make("river") for _ in range(n_countries)],
    }

    entities: list[Entity] = []
    entity_names: dict[Topic, list[str]] = {
        "elements": [names.make("element") for _ in range(n_elements)],
        "minerals": [names.make("mineral") for _ in range(n_minerals)],
        "people": [names.make("person") for _ in range(n_people)],
        "countries": [names.make("country") for _ in range(n_countries)],
    }
    for topic in TOPICS:
        relations = [relation for relation in RELATIONS if relation.topic == topic]
        values = {
            relation.name: _assign_values(rng, relation.name, pools[relation.name], sizes[topic])
            for relation in relations
        }
        for index, name in enumerate(entity_names[topic]):
            attributes = tuple((relation.name, values[relation.name][index]) for relation in relations)
            entities.append(Entity(name, topic, attributes))

    facts: list[Fact] = []
    position_in_relation: dict[str, int] = {}
    for entity in entities:
        for relation_name, value in entity.attributes:
            relation = _RELATION_BY_NAME[relation_name]
            index = position_in_relation.get(relation_name, 0)
            position_in_relation[relation_name] = index + 1
            facts.append(_make_fact(rng, relation, entity.name, value, pools[relation_name], index))
    return SyntheticWorld(seed=seed, entities=tuple(entities), facts=tuple(facts), sizes=tuple(sizes.items()))


def train_prompts(fact: Fact) -> tuple[str, str]:
    """Return the two prompts a synthetic fact is trained with: ``prompt`` and ``paraphrases[1]``."""
    _check_synthetic(fact)
    return fact.prompt, fact.paraphrases[1]


def heldout_prompt(fact: Fact) -> str:
    """Return the prompt held out from training for a synthetic fact: ``paraphrases[0]``."""
    _check_synthetic(fact)
    return fact.paraphrases[0]


def prompt_variants(facts: Sequence[Fact], which: PromptKind) -> tuple[Fact, ...]:
    """Return copies of synthetic facts prompted with their training or held-out templates.

    ``"train"`` gives two facts per input fact, one per training template, with ids suffixed ``"/train0"`` and
    ``"/train1"``. ``"heldout"`` gives one fact per input fact, prompted with the held-out template, with the id
    suffixed ``"/heldout"``. Score them with :func:`excise.verify.accuracy.score_facts`.
    """
    if which not in PROMPT_KINDS:
        raise ValueError(f"which must be one of {PROMPT_KINDS}, got {which!r}")
    variants: list[Fact] = []
    for fact in facts:
        if which == "heldout":
            variants.append(dataclasses.replace(fact, id=f"{fact.id}/heldout", prompt=heldout_prompt(fact)))
        else:
            for index, prompt in enumerate(train_prompts(fact)):
                variants.append(dataclasses.replace(fact, id=f"{fact.id}/train{index}", prompt=prompt))
    return tuple(variants)


def _make_fact(rng: random.Random, relation: Relation, subject: str, value: str, pool: list[str], index: int) -> Fact:
    # Rotate the held-out template over the relation's entities, so each wording is trained for two thirds of them.
    heldout = index % len(relation.templates)
    trained = [i for i in range(len(relation.templates)) if i != heldout]
    others = sorted(set(pool) - {value})
    distractors = tuple(f" {word}" for word in rng.sample(others, N_DISTRACTORS))
    return Fact(
        id=f"{relation.name}-{subject}",
        prompt=relation.render(trained[0], subject),
        target=f" {value}",
        distractors=distractors,
        paraphrases=(relation.render(heldout, subject), relation.render(trained[1], subject)),
        subject=subject,
        relation=relation.name,
    )


def _assign_values(rng: random.Random, relation: str, pool: list[str], n: int) -> list[str]:
    # Unique attributes (symbols, capitals, rivers) are drawn without replacement. Shared ones (colours,
    # professions, birthplaces) use every value of the pool once when there are enough entities, then repeat.
    if relation in _UNIQUE_RELATIONS:
        return rng.sample(pool, n)
    values = rng.sample(pool, min(n, len(pool))) + [rng.choice(pool) for _ in range(n - len(pool))]
    rng.shuffle(values)
    return values


class _NameMaker:
    """Pronounceable one-word names, unique within one world."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        # Template words are taken too, so that no name or symbol ("By") shares a token with a template.
        self.used: set[str] = {word for relation in RELATIONS for t in relation.templates for word in t.split()}

    def make(self, kind: str) -> str:
        for _ in range(10_000):
            n_syllables = self.rng.choice((1, 2)) if kind in ("element", "mineral", "country") else 2
            stem = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(n_syllables)
            )
            name = (stem + self.rng.choice(_NAME_SUFFIXES[kind])).capitalize()
            if name not in self.used and len(name) >= 4:
                self.used.add(name)
                return name
        raise RuntimeError(f"could not generate a new unique {kind} name; ask for fewer entities")

    def symbol(self) -> str:
        """Return a new two-letter symbol such as ``"Kv"``: an uppercase and a lowercase letter."""
        for _ in range(10_000):
            symbol = self.rng.choice("BCDFGHKLMNPRSTVZ") + self.rng.choice("abdeghiklmnorstuvxz")
            if symbol not in self.used:
                self.used.add(symbol)
                return symbol
        raise RuntimeError("could not generate a new unique symbol; ask for fewer elements and minerals")


def _check_topics(topics: Sequence[str]) -> None:
    for topic in topics:
        if topic not in TOPICS:
            raise ValueError(f"unknown topic {topic!r}; expected one of {TOPICS}")


def _check_synthetic(fact: Fact) -> None:
    if len(fact.paraphrases) != 2:
        raise ValueError(
            f"fact {fact.id!r} has {len(fact.paraphrases)} paraphrases; synthetic facts have exactly two "
            "(held-out template, second training template). Use facts from make_world()."
        )
