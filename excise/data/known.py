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


def load_known(path: str | Path, domain: Domain | None = None) -> dict[str, bool]:
    """Read a record written by :func:`record_known`; return fact id to known.

    Args:
        path: The JSON record.
        domain: When given, the record must be for this domain (same name) and cover every one of its facts.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read known-facts record {path}: {error}; write one with `excise known`") from error
    if not isinstance(data, dict) or not isinstance(data.get("known"), dict):
        raise ValueError(f"{path} is not a known-facts record; write one with `excise known`")
    known = {str(key): bool(value) for key, value in data["known"].items()}
    if domain is not None:
        if data.get("domain") != domain.name:
            raise ValueError(
                f"{path} records domain {data.get('domain')!r}, not {domain.name!r}; record this domain with "
                f"`excise known --domain ... --output FILE`"
            )
        missing = [fact.id for which in FACT_SETS for fact in domain.facts(which) if fact.id not in known]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"{path} has no entry for {len(missing)} facts of domain {domain.name!r} ({shown}); the domain "
                "changed since the record was written, so record it again with `excise known`"
            )
    return known
