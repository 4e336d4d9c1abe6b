"""What ``python -m ipt_hpc.launch train`` does: freeze the resolved config into ``RUN/train/config.yaml``
and start the ranks: ``torchrun`` on this machine (``local``), in-process (``debug``), or a Slurm job
rendered from ``slurm/train.sbatch`` (``slurm``; submitted by the execution layer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ...config import Config
from ...errors import IptError
from ...layout import RunLayout


def resolved_config_path(run_dir: Path) -> Path:
    return RunLayout.of(run_dir).train_config


def needs_import(cfg: Config, run_dir: Path) -> bool:
    """True if the run will import ``train.init_from_hf`` (it is set and the run has no checkpoint yet)."""
    from .checkpoint import latest

    return bool(cfg.train.init_from_hf) and latest(RunLayout.of(run_dir).checkpoints) is None


def check_start(cfg: Config, run_dir: Path) -> None:
    """Refuse, before any job is submitted, a start the job itself would refuse: a Hugging Face folder to
    import (``train.init_from_hf``) whose shapes do not fit ``train.model``."""
    if cfg.train.init_from_hf and needs_import(cfg, run_dir):
        from .hf_init import check_hf_config

        check_hf_config(cfg.train, cfg.train.init_from_hf)


def freeze_config(cfg: Config, run_dir: Path) -> Path:
    """Write the whole resolved config where every rank (and every requeued attempt) reads it."""
    path = resolved_config_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    from ...atomic import atomic_write_bytes

    atomic_write_bytes(path, text.encode())
    return path


def free_port() -> int:
    """A TCP port free on this host now, for a local rendezvous (torchrun's ``--master-port``): asked of the
    kernel, so runs started side by side (tests in parallel, two users' debug runs) do not collide."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(cfg: Config, run_dir: Path, port: int | None = None) -> list[str]:
    """``torchrun`` for one node: ``train.ranks_per_node`` rank processes of ``python -m ipt_hpc.model.train``."""
    t = cfg.train
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={t.ranks_per_node}",
        "--nnodes=1",
        f"--master-port={port or free_port()}",
        "-m",
        "ipt_hpc.model.train",
        str(run_dir),
    ]


def run_local(cfg: Config, run_dir: Path) -> int:
    """Run the ranks here with torchrun (blocking): 0 when training is done, 75 when it stopped early with
    a checkpoint (signal, ``exit_duration_min``), else torchrun's code (torchrun turns any rank's non-zero
    code into 1, so the outcome is read from ``RUN/train``)."""
    check_local_cuda(cfg)
    freeze_config(cfg, run_dir)
    rc = subprocess.call(torchrun_command(cfg, run_dir))
    return outcome(run_dir, rc)


def outcome(run_dir: Path, rc: int) -> int:
    """0 if ``RUN/train/done.json`` says training finished, 75 if the last logged event is a clean early exit."""
    from .loop import EXIT_RESUME

    run = RunLayout.of(run_dir)
    if (run.train / "done.json").exists():
        return 0
    log = run.train_log
    if log.exists():
        events = [line for line in log.read_text(encoding="utf-8").splitlines() if '"kind":"event"' in line]
        if events and '"event":"exit"' in events[-1]:
            return EXIT_RESUME
    return rc or 1


def run_debug(cfg: Config, run_dir: Path) -> int:
    """One rank in this process (world size 1), for pdb."""
    from .loop import train

    if cfg.train.tensor_parallel * cfg.train.pipeline_parallel != 1:
        raise IptError("train --executor debug runs one rank: set train.tensor_parallel=1 train.pipeline_parallel=1")
    check_local_cuda(cfg)
    freeze_config(cfg, run_dir)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return train(cfg.train, run_dir)


def slurm_execution(cfg: Config) -> Any:
    """The execution settings of the training job: with ``train.device=cuda`` it asks for one GPU per rank
    (``gpus_per_node`` defaults to ``ranks_per_node``); fewer GPUs than ranks per node is an error."""
    t, s = cfg.train, cfg.execution.slurm
    if t.device != "cuda":
        return cfg.execution
    if s.gpus_per_node is None:
        s = s.model_copy(update={"gpus_per_node": t.ranks_per_node})
    elif s.gpus_per_node < t.ranks_per_node:
        raise IptError(
            f"train: execution.slurm.gpus_per_node={s.gpus_per_node} is fewer than train.ranks_per_node="
            f"{t.ranks_per_node} (one GPU per rank); raise gpus_per_node, lower ranks_per_node, or set train.device=cpu"
        )
    return cfg.execution.model_copy(update={"slurm": s})


def check_local_cuda(cfg: Config) -> None:
    """Before torchrun starts ranks here: ``train.device=cuda`` needs as many CUDA devices as ranks."""
    if cfg.train.device != "cuda":
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < cfg.train.ranks_per_node:
        raise IptError(
            f"train: train.device=cuda with {cfg.train.ranks_per_node} rank(s) per node, but this machine has {have}"
            " CUDA device(s); use --executor slurm for GPU nodes, or set train.device=cpu to train on CPUs"
        )


def slurm_script(cfg: Config, run_dir: Path, python: str | None = None) -> str:
    """The sbatch script of this run's training job (what ``--dry-run`` prints)."""
    from ...execution.sbatch import render_train

    t = cfg.train
    return render_train(
        run_dir,
        slurm_execution(cfg),
        nodes=t.nodes,
        ranks_per_node=t.ranks_per_node,
        signal_name=t.exit_signal.upper().removeprefix("SIG"),
        signal_delay_s=t.signal_delay_s,
        args=["--config", str(resolved_config_path(run_dir).resolve())],
        python=python,
    )


def submit_slurm(cfg: Config, run_dir: Path, dependency: str | None = None) -> str:
    """Freeze the config, render the job script and submit it (after ``dependency``); returns the job id."""
    import time

    from ...execution.backends import submit_script

    freeze_config(cfg, run_dir)
    script = slurm_script(cfg, run_dir)
    path = RunLayout.of(run_dir).train / "slurm" / f"train-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    return submit_script(script, path, dependency)
