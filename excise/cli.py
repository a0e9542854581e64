"""The ``excise`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from excise.verify.cli import add_verify_arguments, verify_command
from excise.verify.relearn import RelearnSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="excise", description="Locate, remove and verify the removal of knowledge in a language model."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage (INFO level)")
    commands = parser.add_subparsers(dest="command")

    run = commands.add_parser("run", help="run a whole study (locate, edit, verify) and write a report folder")
    run.add_argument("--model", default="smollm2-135m-instruct", help="model name (default: %(default)s)")
    run.add_argument(
        "--domain",
        default="chemistry",
        help="bundled domain name or path of a .jsonl domain file (default: %(default)s)",
    )
    run.add_argument(
        "--output", type=Path, default=Path("excise-report"), help="new report folder (default: %(default)s)"
    )
    run.add_argument("-k", "--k", type=int, default=200, help="number of sites to ablate (default: %(default)s)")
    run.add_argument(
        "--retain-weight",
        type=float,
        default=2.0,
        help="rank sites by forget - w * |retain| effect (default: %(default)s; 0 ranks by the forget effect)",
    )
    run.add_argument(
        "--keep-massive",
        action="store_true",
        help="allow ablating massive-activation neurons (by default they are left out; their scores are unreliable)",
    )
    run.add_argument("--kind", choices=["neuron", "head"], default="neuron", help="kind of site (default: %(default)s)")
    run.add_argument(
        "--ablation",
        choices=["zero", "mean"],
        default="zero",
        help="value written in place of a site (default: %(default)s)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seed of the fact splits and the attack (default: %(default)s)"
    )
    run.add_argument("--quick", action="store_true", help="use fewer facts and a shorter relearning attack")
    run.add_argument(
        "--all-facts", action="store_true", help="keep facts the model does not know (default: known only)"
    )
    run.add_argument(
        "--known",
        type=Path,
        help="JSON record from `excise known` of the facts to treat as known (default: rank them with this model)",
    )
    run.add_argument("--relearn-steps", type=int, help="finetuning steps of the relearning attack")
    run.add_argument("--relearn-lr", type=float, help="Adam learning rate of the relearning attack")
    run.add_argument(
        "--suite",
        choices=["none", "quick", "default"],
        help="budget of the full verify suite after the edit (default: none; quick adds about 15 minutes on 2 cores)",
    )
    run.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: %(default)s)")

    verify = commands.add_parser("verify", help="check whether a saved edit's forgetting survives attacks")
    add_verify_arguments(verify)

    known = commands.add_parser("known", help="record which facts of a domain a model ranks correctly")
    known.add_argument("--model", default="smollm2-135m-instruct", help="model name (default: %(default)s)")
    known.add_argument(
        "--domain", default="chemistry", help="bundled domain name or .jsonl path (default: %(default)s)"
    )
    known.add_argument("--output", type=Path, required=True, help="JSON file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "known":
            return _known(args)
        if args.command == "verify":
            return verify_command(args)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError, TypeError) as error:
        print(f"excise: error: {error}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


def _run(args: argparse.Namespace) -> int:
    from excise.study import StudyConfig, run_study

    relearn = None
    if args.relearn_steps is not None or args.relearn_lr is not None:
        base = RelearnSettings(steps=8, eval_every=2) if args.quick else RelearnSettings()
        relearn = RelearnSettings(
            steps=args.relearn_steps if args.relearn_steps is not None else base.steps,
            lr=args.relearn_lr if args.relearn_lr is not None else base.lr,
            batch_size=base.batch_size,
            eval_every=base.eval_every,
            seed=args.seed,
        )
    config = StudyConfig(
        model=args.model,
        domain=args.domain,
        output=args.output,
        k=args.k,
        retain_weight=args.retain_weight,
        exclude_massive=not args.keep_massive,
        kind=args.kind,
        ablation=args.ablation,
        seed=args.seed,
        quick=args.quick,
        known_only=not args.all_facts,
        known=args.known,
        relearn=relearn,
        suite=args.suite,
        batch_size=args.batch_size,
    )
    report = run_study(config)
    print(f"{report.summary_line()}; report: {args.output / 'report.html'}")
    return 0


def _known(args: argparse.Namespace) -> int:
    from excise.data.known import record_known
    from excise.models import load
    from excise.study import load_study_domain

    domain = load_study_domain(args.domain)
    path = record_known(load(args.model), domain, args.output, model_name=args.model)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
