"""Facts and domains: the knowledge a study removes and the knowledge it must keep.

A :class:`Fact` is one piece of knowledge written as a cloze prompt whose continuation is ``target``. Accuracy is
measured by likelihood ranking: the model knows a fact when it gives ``target`` a higher log-probability than every
one of ``distractors`` after ``prompt``.

Warning:
    ``target`` and ``distractors`` carry the leading space that the tokenizer expects after the prompt
    (``" Paris"``, not ``"Paris"``). Without it, a BPE tokenizer scores an unusual token sequence and the
    ranking is meaningless. :func:`excise.data.load_domain` rejects answers without a leading space unless the
    prompt itself ends in white space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

FactSet = Literal["forget", "neighbour", "retain"]
FACT_SETS: tuple[FactSet, ...] = get_args(FactSet)


@dataclasses.dataclass(frozen=True)
class Fact:
    """One piece of knowledge as a cloze prompt.

    Attributes:
        id: Identifier unique within its domain, e.g. ``"chem-symbol-gold"``.
        prompt: Text the model continues, e.g. ``"The chemical symbol for gold is"``.
        target: The correct continuation, with its leading space, e.g. ``" Au"``.
        distractors: Wrong continuations of the same type (other element symbols), each with the leading space.
            Accuracy ranks ``target`` among them, so chance level is ``1 / (1 + len(distractors))``.
        paraphrases: Other prompts with the same ``target``, used by paraphrase attacks and ROME's metrics.
        subject: The span of ``prompt`` that names the entity (``"gold"``); causal tracing corrupts it and ROME
            edits the MLP at its last token. Must occur in ``prompt``.
        relation: Kind of fact, e.g. ``"element_symbol"``; used to group results.
        split: Optional user-assigned split name, e.g. ``"train"`` or ``"test"``.
    """

    id: str
    prompt: str
    target: str
    distractors: tuple[str, ...]
    paraphrases: tuple[str, ...] = ()
    subject: str | None = None
    relation: str | None = None
    split: str | None = None

    @property
    def choices(self) -> tuple[str, ...]:
        """The target followed by the distractors; index 0 is correct."""
        return (self.target, *self.distractors)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "target": self.target,
            "distractors": list(self.distractors),
            "paraphrases": list(self.paraphrases),
            "subject": self.subject,
            "relation": self.relation,
            "split": self.split,
        }


@dataclasses.dataclass(frozen=True)
class Domain:
    """What a study forgets and what it keeps.

    Attributes:
        name: Short name used in reports and file names.
        forget: Facts to remove.
        neighbour: Facts close to the forget domain that must be kept (physics when forgetting chemistry). They
            show whether an edit is selective or only damages a broad topic.
        retain: Unrelated facts that must be kept.
        forget_corpus: Optional free text of the forget domain, for relearning on text and for RMU.
        retain_corpus: Optional free text to keep, for unlearning baselines that need a retain loss.
    """

    name: str
    forget: tuple[Fact, ...]
    neighbour: tuple[Fact, ...] = ()
    retain: tuple[Fact, ...] = ()
    forget_corpus: tuple[str, ...] = ()
    retain_corpus: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.forget:
            raise ValueError(f"domain {self.name!r} has no forget facts; add at least one record with set 'forget'")
        seen: set[str] = set()
        for fact in self.all_facts():
            if fact.id in seen:
                raise ValueError(f"domain {self.name!r} has two facts with id {fact.id!r}; fact ids must be unique")
            seen.add(fact.id)

    def facts(self, which: FactSet) -> tuple[Fact, ...]:
        """Return one fact set by name."""
        if which not in FACT_SETS:
            raise ValueError(f"unknown fact set {which!r}; expected one of {FACT_SETS}")
        return getattr(self, which)

    def all_facts(self) -> tuple[Fact, ...]:
        return (*self.forget, *self.neighbour, *self.retain)

    def subset(self, keep_ids: Iterable[str]) -> Domain:
        """Return a domain with only the facts whose id is in ``keep_ids`` (corpora are kept as they are)."""
        keep = set(keep_ids)
        return dataclasses.replace(
            self,
            forget=tuple(f for f in self.forget if f.id in keep),
            neighbour=tuple(f for f in self.neighbour if f.id in keep),
            retain=tuple(f for f in self.retain if f.id in keep),
        )

    def limit(self, n_forget: int | None = None, n_neighbour: int | None = None, n_retain: int | None = None) -> Domain:
        """Return a domain with at most the given number of facts per set, keeping file order."""
        return dataclasses.replace(
            self,
            forget=_head(self.forget, n_forget),
            neighbour=_head(self.neighbour, n_neighbour),
            retain=_head(self.retain, n_retain),
        )

    def __repr__(self) -> str:
        return (
            f"Domain(name={self.name!r}, forget={len(self.forget)}, neighbour={len(self.neighbour)}, "
            f"retain={len(self.retain)}, forget_corpus={len(self.forget_corpus)}, "
            f"retain_corpus={len(self.retain_corpus)})"
        )


def split_facts(facts: Sequence[Fact], fraction: float, seed: int) -> tuple[tuple[Fact, ...], tuple[Fact, ...]]:
    """Split facts at random into two disjoint parts; the first has ``round(fraction * len(facts))`` facts."""
    import random

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    cut = round(fraction * len(facts))
    first = tuple(facts[i] for i in sorted(order[:cut]))
    second = tuple(facts[i] for i in sorted(order[cut:]))
    return first, second


def _head(facts: tuple[Fact, ...], n: int | None) -> tuple[Fact, ...]:
    if n is None:
        return facts
    if n < 0:
        raise ValueError(f"a fact count must be >= 0, got {n}")
    return facts[:n]
