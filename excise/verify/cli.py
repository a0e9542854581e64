"""The ``excise verify`` command: run the deep-forgetting suite on a saved edit and write a report folder.

Wire it into the ``excise`` parser with::

    verify = commands.add_parser("verify", help="check whether a saved edit's forgetting survives attacks")
    add_verify_arguments(verify)
    ...
    if args.command == "verify":
        return verify_command(args)

Arguments (attributes of the ``argparse.Namespace``):

- ``edit`` (Path): folder written by :meth:`excise.edit.base.Edit.save` (``edit.json`` + ``edit.safetensors``), e.g.
  the ``edit/`` folder of an ``excise run`` report.
- ``model`` (str): name for :func:`excise.models.load`; must be the model the edit was made for.
- ``domain`` (str): bundled domain name or path of a ``.jsonl`` domain file.
- ``output`` (Path): new report folder; must not exist or be empty.
- ``twin`` (str or None): name of a model that never learned the domain, for :func:`excise.models.load`.
- ``form`` (``"weights"`` or ``"hooks"``): bake the edit into the weights or run it as hooks.
- ``budget`` (``"quick"`` or ``"default"``), ``seed`` (int), ``max_facts`` (int or None, overrides the budget's).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from transformer_lens import HookedTransformer

from excise.verify.suite import BUDGET_NAMES, EDIT_FORMS

logger = logging.getLogger(__name__)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments that :func:`verify_command` reads to ``parser``."""
    parser.add_argument("--edit", type=Path, required=True, help="folder of a saved edit (edit.json, edit.safetensors)")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="model the edit was made for (default: %(default)s)"
    )
    parser.add_argument(
        "--domain", default="chemistry", help="bundled domain name or path of a .jsonl file (default: %(default)s)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("excise-verify"), help="new report folder (default: %(default)s)"
    )
    parser.add_argument("--twin", default=None, help="model that never learned the domain, as a reference (optional)")
    parser.add_argument(
        "--form",
        choices=EDIT_FORMS,
        default="weights",
        help="bake the edit into weights or run it as hooks (default: %(default)s)",
    )
    parser.add_argument(
        "--budget", choices=BUDGET_NAMES, default="quick", help="attacker budget (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fact split and the attacks (default: %(default)s)"
    )
    parser.add_argument(
        "--max-facts", type=int, default=None, help="at most this many facts per set (default: the budget's)"
    )


def load_model(name: str) -> HookedTransformer:
    """Load a model by name with :func:`excise.models.load` (tests replace this function)."""
    from excise.models import load

    return load(name)


def verify_command(args: argparse.Namespace) -> int:
    """Run the suite for ``args`` (see the module docstring), write ``report.json``, ``report.html`` and
    ``attacks.csv`` to ``args.output``, print a summary line and return the exit status 0."""
    from excise.edit.base import load_edit
    from excise.io import atomic_folder
    from excise.study import check_output_folder, load_study_domain
    from excise.verify.suite import budget_settings, run_suite

    output = Path(args.output)
    check_output_folder(output)
    edit = load_edit(args.edit)
    domain = load_study_domain(args.domain)
    settings = budget_settings(args.budget, args.seed)
    if getattr(args, "max_facts", None) is not None:
        settings = dataclasses.replace(settings, max_facts=args.max_facts)
    start = time.perf_counter()
    original = load_model(args.model)
    twin = load_model(args.twin) if args.twin else None
    load_seconds = time.perf_counter() - start
    result = run_suite(edit, domain, original=original, twin=twin, form=args.form, budget=settings, seed=args.seed)
    report = result.to_report(model_name=args.model, domain_name=domain.name)
    report.edit.update({"kind": edit.kind, "path": str(args.edit)})
    report.settings.update({"budget": args.budget, "seed": args.seed, "twin": args.twin, "command": "excise verify"})
    report.timings["load"] = load_seconds
    with atomic_folder(output, overwrite=output.exists()) as folder:
        report.save_json(folder / "report.json")
        report.save_html(folder / "report.html")
        result.summary_frame().to_csv(folder / "attacks.csv", index=False)
    worst = result.worst_recovery
    print(
        f"{report.summary_line()}; worst-case recovery {'n/a' if worst != worst else f'{worst:.0%}'} "
        f"({args.form} edit, {args.budget} budget); report: {output / 'report.html'}"
    )
    return 0
