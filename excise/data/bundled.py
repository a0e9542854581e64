"""Domains shipped with excise, loaded by name.

A bundled domain is a JSON Lines file in ``excise/data/domains/`` (format: :mod:`excise.data.jsonl`). The default,
``"chemistry"``, is written for the default model SmolLM2-135M-Instruct. Its forget set holds chemistry facts:
element symbols in both directions, atomic numbers, formulas, reactions, acids and bases, laboratory facts. Physics
and biology facts are the close neighbours to keep, and geography, literature, history, art and everyday facts are
the unrelated facts to keep. Short chemistry and general paragraphs serve methods that train on text. Every
sentence was written for excise.

Warning:
    The facts were chosen for a small model: common knowledge with short answers. Measure what the model knows
    before editing (accuracy by likelihood ranking among the distractors) and report forgetting on the facts it
    knew; a fact the model never knew cannot be forgotten.
"""

from __future__ import annotations

from importlib import resources

from excise.data.facts import Domain
from excise.data.jsonl import load_domain_file

__all__ = ["bundled_domain", "bundled_domain_names"]

_SUFFIX = ".jsonl"


def bundled_domain_names() -> tuple[str, ...]:
    """Return the names of the domains shipped with excise, sorted."""
    root = resources.files("excise.data") / "domains"
    return tuple(sorted(entry.name[: -len(_SUFFIX)] for entry in root.iterdir() if entry.name.endswith(_SUFFIX)))


def bundled_domain(name: str = "chemistry") -> Domain:
    """Load a domain shipped with excise.

    Args:
        name: The domain's name, one of :func:`bundled_domain_names` (``"chemistry"``).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: No bundled domain has this name.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a domain name string, got {type(name).__name__} {name!r}")
    names = bundled_domain_names()
    if name not in names:
        raise ValueError(
            f"name: no bundled domain {name!r}; bundled domains are {names}. "
            "To load your own file, use excise.data.jsonl.load_domain_file(path)."
        )
    resource = resources.files("excise.data") / "domains" / f"{name}{_SUFFIX}"
    with resources.as_file(resource) as path:
        return load_domain_file(path, name=name)
