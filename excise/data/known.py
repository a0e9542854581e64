"""Record which facts of a domain a model knows, so studies can use the known subset without rescoring."""

from __future__ import annotations

import json
from pathlib import Path

from transformer_lens import HookedTransformer

from excise.data.facts import FACT_SETS, Domain
from excise.io import atomic_write_text
from excise.verify.accuracy import score_facts


def record_known(model: HookedTransformer, domain: Domain, path: str | Path, *, model_name: str) -> Path:
    """Score every fact and write ``{"model", "domain", "known": {fact_id: bool}, "margin": {...}}`` as JSON."""
    known: dict[str, bool] = {}
    margin: dict[str, float] = {}
    for which in FACT_SETS:
        facts = domain.facts(which)
        if not facts:
            continue
        table = score_facts(model, facts, description=f"scoring {which} facts").table
        known.update(dict(zip(table["id"], table["correct"].astype(bool), strict=True)))
        margin.update({fid: round(float(m), 4) for fid, m in zip(table["id"], table["margin"], strict=True)})
    record = {"model": model_name, "domain": domain.name, "known": known, "margin": margin}
    atomic_write_text(Path(path), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return Path(path)


def load_known(path: str | Path) -> dict[str, bool]:
    """Read a record written by :func:`record_known`; return fact id to known."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "known" not in data:
        raise ValueError(f"{path} is not a known-facts record; write one with `excise known`")
    return {str(key): bool(value) for key, value in data["known"].items()}
