"""``train``: pre-train with Megatron-Core (TP/PP/DP) on the run's tokenized groups; resumes from checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..layout import RunLayout
from . import render
from .common import common, flag, load, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "train",
        run,
        help="pre-train with Megatron-Core (TP/PP/DP) on the run's tokenized groups; resumes from checkpoints",
        description="Train a Llama-style GPTModel with Megatron-Core on RUN/tokens/<group> blends (train.data.groups)."
        " Writes RUN/train/: config.yaml, log.jsonl, loss.png, checkpoints/. Rerunning resumes from the latest"
        " complete checkpoint. local: torchrun with train.ranks_per_node ranks here; slurm: one job of train.nodes"
        " nodes (slurm/train.sbatch), requeued after the warning signal; debug: one rank in this process.",
        epilog="examples:\n  python -m ipt_hpc.launch train --config configs/train/tiny.yaml --run runs/demo\n"
        "  python -m ipt_hpc.launch train --config configs/train/tiny.yaml --run runs/demo"
        " --set train.tensor_parallel=2 --set train.ranks_per_node=2\n"
        "  python -m ipt_hpc.launch train --config configs/train/instructlm-500m.yaml --run /scratch/rw"
        " --executor slurm --nodes 4 --ranks-per-node 8 --set execution.slurm.gpus_per_node=8 --dry-run",
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder (reads RUN/tokens, writes RUN/train)")
    flag(p, "--nodes", key="train.nodes", type=int, metavar="N")
    flag(p, "--ranks-per-node", key="train.ranks_per_node", type=int, metavar="G")
    flag(p, "--iters", key="train.train_iters", type=int, metavar="N", help="train.train_iters")
    flag(p, "--signal", key="train.exit_signal", metavar="NAME",
         help="train.exit_signal: Slurm's warning signal (default USR1)")  # fmt: skip
    flag(p, "--exit-duration", key="train.exit_duration_min", type=float, metavar="MIN")
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..model.train import stage

    cfg = load(args)
    run_dir = Path(args.run)
    backend = cfg.execution.backend
    stage.check_start(cfg, run_dir)  # fail here, not in the job, on a misfit
    if args.dry_run:
        if backend == "slurm":
            sys.stdout.write(stage.slurm_script(cfg, run_dir))
            return 0
        t = cfg.train
        return render.dry_run(
            None,
            [
                f"train on {backend}: {' '.join(stage.torchrun_command(cfg, run_dir))}",
                f"  {t.model.num_layers} layers x {t.model.hidden_size},"
                f" TP {t.tensor_parallel} PP {t.pipeline_parallel},"
                f" {t.train_iters} iterations of {t.global_batch_size} x {t.seq_length} tokens, groups {t.data.groups}",
            ],
        )
    if backend == "slurm":
        job = stage.submit_slurm(cfg, run_dir)
        layout = RunLayout.of(run_dir)
        print(f"submitted training job {job}; log: {layout.train_log}, {layout.train / 'logs'}")
        return 0
    rc = stage.run_debug(cfg, run_dir) if backend == "debug" else stage.run_local(cfg, run_dir)
    if rc == 75:
        print("train: stopped early with a complete checkpoint; rerun the same command to resume", file=sys.stderr)
    return rc
