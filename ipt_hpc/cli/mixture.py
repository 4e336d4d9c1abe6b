"""``mixture``: Megatron blend weights and token shares of a run's tokenized groups."""

from __future__ import annotations

import argparse
from typing import Any

from ..layout import RunLayout
from . import render
from .common import config_options, load, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "mixture",
        run,
        help="Megatron blend weights and token shares of a run's tokenized groups",
        description="Read RUN/tokens/*/manifest.json, apply mixture.groups (repeat or share per group) and write"
        " RUN/mixture.json with the weights for megatron-core's BlendedMegatronDatasetBuilder.",
        epilog="example:\n  python -m ipt_hpc.launch mixture --run runs/demo --config configs/refinedweb.yaml",
    )
    p.add_argument("--run", metavar="RUN", required=True)
    config_options(p, "YAML config with a mixture section", None)


def run(args: argparse.Namespace) -> int:
    from ..stages.mixture import write_report

    cfg = load(args)
    report = write_report(args.run, cfg.mixture.groups, cfg.mixture.train_tokens)
    rows = [
        (
            name,
            f"{row['documents']:,}",
            f"{row['tokens']:,}",
            f"{row['weight']:.4f}",
            f"{row['epochs']:.2f}" if "epochs" in row else "-",
        )
        for name, row in report["groups"].items()
    ]
    columns = ("group", "documents", "tokens", "weight (share of training tokens)", "epochs")
    console = render.console()
    console.print(render.table(f"mixture of {args.run}", columns, rows))
    console.print(f"Megatron blend (data_path): {' '.join(report['data_path'])}")
    console.print(f"written to {RunLayout.of(args.run).mixture}")
    return 0
