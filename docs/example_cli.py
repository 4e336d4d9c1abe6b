"""The example stage's command (docs/design.md, "Adding a stage"): ``ipt_hpc/cli/wordcount.py`` in the package."""

from __future__ import annotations

import argparse
from typing import Any

from ipt_hpc.cli.common import common, run_stage_command, shard_options, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(sub, "wordcount", run, help="count the words of every raw document")
    p.add_argument("--run", metavar="RUN", required=True)
    shard_options(p)  # --shards SPEC, --wait
    common(p)  # --config, --set, --executor, --workers, ..., --dry-run, --force


def run(args: argparse.Namespace) -> int:
    from example_stage import STAGE  # in the package: from ..stages.wordcount import STAGE

    rc, result, out = run_stage_command(args, STAGE, lambda run, cfg: [f"wordcount {run.num_shards} shards"])
    if result and result["manifest"]:  # the stage is complete
        print(f"{result['manifest']['totals']['words']:,} words in {out}")
    return rc
