"""``run-shard``: run shards of a prepared per-shard stage here (the entry point of hand-written sbatch arrays)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "run-shard",
        run,
        help="run shards of a prepared per-shard stage here (the entry point of hand-written sbatch arrays)",
        description="Run shard OFFSET + TASK_INDEX*K + j (j < K) of a prepared stage folder; done shards are"
        " skipped, partial ones resume. USR2 makes progress durable and requeues the Slurm job.",
        epilog="examples:\n  sbatch --array=0-999%64 slurm/stage-array.sbatch RUN/synth\n"
        "  python -m ipt_hpc.launch run-shard --stage-dir RUN/synth --task-index 17",
    )
    p.add_argument("--stage-dir", required=True, metavar="DIR")
    p.add_argument("--task-index", type=int, default=0, metavar="I", help="usually $SLURM_ARRAY_TASK_ID")
    p.add_argument("--shards-per-task", type=int, default=1, metavar="K")
    p.add_argument("--offset", type=int, default=0, metavar="O", help="first shard of task 0")


def run(args: argparse.Namespace) -> int:
    from ..execution.sbatch import run_shards

    return run_shards(args.stage_dir, args.task_index, args.shards_per_task, args.offset)
