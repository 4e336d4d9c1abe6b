"""``report``: one markdown + HTML page per run."""

from __future__ import annotations

import argparse
from typing import Any

from . import render
from .common import subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "report",
        run,
        help="one markdown + HTML page per run: stages, synthesis stats, mixture, loss curve, eval, PNG charts",
        description="Write RUN/report/report.md and report.html (with PNG charts beside them) from the run's"
        " manifests, training log and evaluation results; sections appear for the stages the run holds.",
        epilog="example:\n  python -m ipt_hpc.launch report --run runs/demo && chromium runs/demo/report/report.html",
    )
    p.add_argument("--run", metavar="RUN", required=True)


def run(args: argparse.Namespace) -> int:
    from ..report import build

    out = build(args.run)
    render.console().print(f"report ({', '.join(out['sections'])}):\n  {out['markdown']}\n  {out['html']}")
    return 0
