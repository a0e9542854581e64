"""Read and write domains as JSON Lines, with a schema check that reports every bad record.

One record per line. A fact record::

    {"set": "forget", "id": "chem-symbol-gold", "prompt": "The chemical symbol for gold is",
     "target": " Au", "distractors": [" Ag", " Fe", " Cu"], "paraphrases": ["Gold's element symbol is"],
     "subject": "gold", "relation": "element_symbol"}

``set`` is one of ``forget``, ``neighbour`` or ``retain``; ``id``, ``prompt``, ``target`` and at least one
distractor are required. A corpus record adds free text to the domain: ``{"set": "forget_corpus", "text": "..."}``
or ``{"set": "retain_corpus", "text": "..."}``. Blank lines and lines starting with ``//`` are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from excise.data.facts import FACT_SETS, Domain, Fact
from excise.io import atomic_write_text

CORPUS_SETS = ("forget_corpus", "retain_corpus")
_FACT_FIELDS = {"set", "id", "prompt", "target", "distractors", "paraphrases", "subject", "relation", "split"}


class DomainFormatError(ValueError):
    """A domain file has invalid records; ``problems`` lists each as ``file:line: field: message``."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"invalid domain file {path} ({len(problems)} problem(s)):\n  {shown}{more}")


def load_domain_file(path: str | os.PathLike[str], name: str | None = None) -> Domain:
    """Load a domain from a JSON Lines file, checking every record.

    Args:
        path: The ``.jsonl`` file.
        name: Domain name; defaults to the file name without its extension.

    Raises:
        FileNotFoundError: The file does not exist.
        DomainFormatError: One or more records are invalid; all problems are listed, not only the first.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain file not found: {path}")
    sets: dict[str, list[Fact]] = {key: [] for key in FACT_SETS}
    corpora: dict[str, list[str]] = {key: [] for key in CORPUS_SETS}
    problems: list[str] = []
    ids: dict[str, int] = {}

    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("//"):
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: invalid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            which = record.get("set")
            if which in CORPUS_SETS:
                text = record.get("text")
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{where}: text: a {which} record needs a non-empty string 'text'")
                else:
                    corpora[which].append(text)
                continue
            if which not in FACT_SETS:
                allowed = ", ".join((*FACT_SETS, *CORPUS_SETS))
                problems.append(f"{where}: set: got {which!r}, expected one of {allowed}")
                continue
            fact, record_problems = _parse_fact(record)
            problems.extend(f"{where}: {problem}" for problem in record_problems)
            if fact is None:
                continue
            if fact.id in ids:
                problems.append(f"{where}: id: {fact.id!r} repeats the id on line {ids[fact.id]}")
                continue
            ids[fact.id] = line_number
            sets[which].append(fact)

    if not sets["forget"] and not problems:
        problems.append(f"{path}: set: the file has no 'forget' facts; a domain needs at least one")
    if problems:
        raise DomainFormatError(path, problems)
    return Domain(
        name=name or path.stem,
        forget=tuple(sets["forget"]),
        neighbour=tuple(sets["neighbour"]),
        retain=tuple(sets["retain"]),
        forget_corpus=tuple(corpora["forget_corpus"]),
        retain_corpus=tuple(corpora["retain_corpus"]),
    )


def save_domain_file(domain: Domain, path: str | os.PathLike[str]) -> None:
    """Write a domain as JSON Lines, atomically (a crash leaves the old file or the new one, never half)."""
    lines: list[str] = []
    for which in FACT_SETS:
        for fact in domain.facts(which):
            lines.append(json.dumps({"set": which, **fact.to_dict()}, ensure_ascii=False))
    for text in domain.forget_corpus:
        lines.append(json.dumps({"set": "forget_corpus", "text": text}, ensure_ascii=False))
    for text in domain.retain_corpus:
        lines.append(json.dumps({"set": "retain_corpus", "text": text}, ensure_ascii=False))
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def _parse_fact(record: dict[str, Any]) -> tuple[Fact | None, list[str]]:
    problems: list[str] = []
    unknown = sorted(set(record) - _FACT_FIELDS)
    if unknown:
        problems.append(f"{', '.join(unknown)}: unknown field(s); allowed fields are {sorted(_FACT_FIELDS)}")

    def text(field: str, required: bool) -> str | None:
        value = record.get(field)
        if value is None:
            if required:
                problems.append(f"{field}: missing; a fact needs a non-empty string here")
            return None
        if not isinstance(value, str) or not value:
            problems.append(f"{field}: expected a non-empty string, got {value!r}")
            return None
        return value

    def text_list(field: str, min_items: int) -> tuple[str, ...]:
        value = record.get(field, [])
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            problems.append(f"{field}: expected a list of non-empty strings, got {value!r}")
            return ()
        if len(value) < min_items:
            problems.append(f"{field}: needs at least {min_items} item(s), got {len(value)}")
        return tuple(value)

    fact_id = text("id", required=True)
    prompt = text("prompt", required=True)
    target = text("target", required=True)
    subject = text("subject", required=False)
    relation = text("relation", required=False)
    split = text("split", required=False)
    distractors = text_list("distractors", min_items=1)
    paraphrases = text_list("paraphrases", min_items=0)

    if prompt is not None and target is not None:
        answers = [("target", target)] + [("distractors", d) for d in distractors]
        for field, answer in answers:
            if not prompt[-1].isspace() and not answer[0].isspace():
                problems.append(
                    f"{field}: {answer!r} has no leading space; write {' ' + answer!r} so it tokenizes as it "
                    "would follow the prompt"
                )
        if target in distractors:
            problems.append(f"distractors: contains the target {target!r}")
        if len(set(distractors)) != len(distractors):
            problems.append(f"distractors: has repeated entries {list(distractors)!r}")
    if prompt is not None and subject is not None and subject not in prompt:
        problems.append(f"subject: {subject!r} does not occur in the prompt {prompt!r}")

    if problems or fact_id is None or prompt is None or target is None:
        return None, problems
    return (
        Fact(
            id=fact_id,
            prompt=prompt,
            target=target,
            distractors=distractors,
            paraphrases=paraphrases,
            subject=subject,
            relation=relation,
            split=split,
        ),
        problems,
    )
