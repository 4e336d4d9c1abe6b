"""What ``python -m ipt_hpc.launch train`` does: freeze the resolved config into ``RUN/train/config.yaml``
and start the ranks: ``torchrun`` on this machine (``local``), in-process (``debug``), or a Slurm job
rendered from ``slurm/train.sbatch`` (``slurm``; submitted by the execution layer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from ..config import Config
from ..errors import IptError


def resolved_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / "train" / "config.yaml"


def freeze_config(cfg: Config, run_dir: Path) -> Path:
    """Write the whole resolved config where every rank (and every requeued attempt) reads it."""
    path = resolved_config_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
    return path


def torchrun_command(cfg: Config, run_dir: Path, port: int | None = None) -> list[str]:
    """``torchrun`` for one node: ``train.ranks_per_node`` rank processes of ``python -m ipt_hpc.train``."""
    t = cfg.train
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={t.ranks_per_node}",
        "--nnodes=1",
        f"--master-port={port or 29500 + os.getpid() % 2000}",
        "-m",
        "ipt_hpc.train",
        str(run_dir),
    ]


def run_local(cfg: Config, run_dir: Path) -> int:
    """Run the ranks here with torchrun (blocking); returns its exit code."""
    freeze_config(cfg, run_dir)
    return subprocess.call(torchrun_command(cfg, run_dir))


def run_debug(cfg: Config, run_dir: Path) -> int:
    """One rank in this process (world size 1), for pdb."""
    from .loop import train

    if cfg.train.tensor_parallel * cfg.train.pipeline_parallel != 1:
        raise IptError("train --executor debug runs one rank: set train.tensor_parallel=1 train.pipeline_parallel=1")
    freeze_config(cfg, run_dir)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    return train(cfg.train, run_dir)
