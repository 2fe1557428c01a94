"""The ``cmesh`` command line: one module per command group (``models``, ``infer``,
``status``, ``pipeline``, ``profile``/``plan``, ``cost``, ``apply``/``config``/``rollout``). It is an entry point, not
part of the shared library: it may import the services (engines for a dry-run
load, the simulator, the metering store), and it reads the environment."""
from __future__ import annotations

import argparse
import sys

from cmesh.cli import apply, cost, infer, models, pipeline, plan, status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmesh", description="Compound Mesh command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    models.add_parsers(sub)
    infer.add_parsers(sub)
    status.add_parsers(sub)
    pipeline.add_parser(sub)
    plan.add_parsers(sub)                  # cmesh profile, cmesh plan
    cost.add_parsers(sub)
    apply.add_parsers(sub)                 # cmesh apply, cmesh config history, cmesh rollout status
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
