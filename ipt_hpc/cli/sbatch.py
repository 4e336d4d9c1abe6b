"""``sbatch``: print a job-array script for a prepared per-shard stage, with the run's Slurm settings."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import common, load, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "sbatch",
        run,
        help="print an sbatch script for a prepared per-shard stage, with the run's Slurm settings",
        description="Print a job-array script that runs `run-shard` with this config's Slurm settings"
        " (partition, time, GPUs, setup lines); every substituted value is shell-quoted.",
        epilog="example:\n  python -m ipt_hpc.launch sbatch --stage-dir RUN/synth --config configs/x.yaml"
        " --parallelism 64 > synth.sbatch && sbatch synth.sbatch",
    )
    p.add_argument("--stage-dir", required=True, metavar="DIR")
    p.add_argument("--python", help="interpreter on the compute nodes (default: this one)")
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..execution.sbatch import render as render_script

    sys.stdout.write(render_script(args.stage_dir, load(args).execution, python=args.python))
    return 0
