"""The command line of the evaluation, ``python -m tasks.evaluate`` (``tasks/evaluate.py``).

The flags, the options and the dataset reference are checked before the evaluation (and torch) is
imported, so ``--help`` and bad input answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from data.dataset import load_ref
from data.errors import DatasetError, OneLineParser, print_error
from tasks.evaluation.options import add_flags, from_args


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m tasks.evaluate",
        description="Evaluate an exported classifier and/or DiT on the dataset's held-out split; "
        "write report.json, report.md and pictures into --out. The last stdout line is a JSON "
        "summary.",
    )
    p.add_argument(
        "--dataset", required=True, help="DatasetRef JSON, reference.json or version folder"
    )
    p.add_argument("--classifier", help="classifier run dir (model.safetensors + config.json)")
    p.add_argument("--dit", help="DiT run dir (model.safetensors + config.json)")
    p.add_argument(
        "--out", help="report folder (default $TRAIN_CATS_RUNS_DIR/reports/<deployment>/<time>)"
    )
    p.add_argument("--verbose", action="store_true", help="print a failure's full traceback")
    add_flags(p.add_argument_group("options (tasks.evaluation.options.EvalOptions)"))
    return p


def run_cli(load_evaluate: Callable[[], Callable[..., dict]], argv: list[str] | None = None) -> int:
    """Parse and check the flags, then evaluate with `load_evaluate()` (`tasks.evaluate.evaluate`,
    imported only now); print the metrics on stderr and the JSON summary as the last stdout line.

    Bad input and data errors exit with status 2 and one line naming them (`--verbose`: with the
    traceback); other failures raise.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = from_args(args)
        if args.classifier is None and args.dit is None:
            raise ValueError("nothing to evaluate: pass --classifier and/or --dit (export folders)")
        ref = load_ref(args.dataset)
        summary = load_evaluate()(ref, args.classifier, args.dit, args.out, options)
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError) as exc:
        print_error(f"{parser.prog}: error: ", exc, args.verbose)
        return 2
    for name, value in summary["metrics"].items():
        print(f"{name:45s} {value:.4g}", file=sys.stderr)
    for name, reason in summary["not_computed"].items():
        print(f"{name:45s} not computed: {reason}", file=sys.stderr)
    print(json.dumps(summary))
    return 0
