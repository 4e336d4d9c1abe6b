"""Command line: ``python -m ipt_hpc.launch <stage> ...`` (or ``ipt-hpc <stage> ...``).

One module per command, each with ``add_parser(sub)`` and ``run(args) -> int``: it maps flags to the
config (:mod:`.common`), calls one stage function and shows the result (:mod:`.render`).
Errors a user can act on are printed as one message, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import IptError
from . import (
    decontaminate,
    doctor,
    evaluate,
    export,
    finetune_synthesizer,
    merge,
    mixture,
    pipeline,
    plan,
    publish,
    report,
    run_shard,
    sbatch,
    shard,
    status,
    synthesize,
    templify,
    tokenize,
    train,
)

# in the order ``--help`` lists them
COMMANDS = (
    shard,
    synthesize,
    finetune_synthesizer,
    templify,
    decontaminate,
    mixture,
    report,
    tokenize,
    publish,
    evaluate,
    merge,
    train,
    export,
    plan,
    pipeline,
    status,
    run_shard,
    sbatch,
    doctor,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ipt_hpc.launch",
        description="Instruction Pre-Training at HPC scale: run one pipeline stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ipt_hpc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except IptError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
