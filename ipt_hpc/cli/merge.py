"""``merge``: a tokenized group's shards -> RUN/tokens/GROUP.{bin,idx} (after tokenize's Slurm arrays)."""

from __future__ import annotations

import argparse
from typing import Any

from ..layout import RunLayout


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge a tokenized group's shards into RUN/tokens/GROUP.{bin,idx}")
    p.add_argument("--run", metavar="RUN", required=True)
    p.add_argument("--group", metavar="NAME", required=True)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..execution.submit import load_stage_run
    from ..stages.tokenize import merge_group

    manifest = merge_group(load_stage_run(RunLayout.of(args.run).token_group(args.group)))
    print(f"{manifest['dataset']}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens")
    return 0
