"""Backends: submitit executors for ``local`` and ``slurm``, array splitting, queue queries.

This is the only module that builds submitit executors or runs Slurm commands.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ExecutionConfig
from ..errors import IptError

SLURM_CMD_TIMEOUT = 60
UNLIMITED_ARRAY = 1 << 30


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def _slurm(*args: str) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise IptError(f"{args[0]}: not found; is this a Slurm login node? (or use --executor local)") from exc
    except subprocess.TimeoutExpired as exc:
        raise IptError(f"{' '.join(args)}: no answer in {SLURM_CMD_TIMEOUT} s; is slurmctld up?") from exc
    if proc.returncode != 0:
        raise IptError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@functools.lru_cache(maxsize=1)
def cluster_max_array_size() -> int:
    """``MaxArraySize`` of the cluster (``scontrol show config``); array indices must stay below it."""
    for line in _slurm("scontrol", "show", "config").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return int(value.strip())
    return 1001  # Slurm's default


def max_array_size(cfg: ExecutionConfig) -> int:
    if cfg.max_array_size is not None:
        return cfg.max_array_size
    return cluster_max_array_size() if cfg.backend == "slurm" else UNLIMITED_ARRAY


def pack(n: int, per_task: int) -> list[list[int]]:
    """Consecutive packs of ``per_task`` item indices: ``pack(5, 2) == [[0, 1], [2, 3], [4]]``."""
    return [list(range(i, min(i + per_task, n))) for i in range(0, n, per_task)]


def split(packs: list[list[int]], limit: int) -> list[list[list[int]]]:
    """Split packs into arrays of at most ``limit`` tasks (one sbatch call each)."""
    return [packs[i : i + limit] for i in range(0, len(packs), limit)]


def _mem(gb: float) -> str:
    return f"{math.ceil(gb * 1024)}M"


def slurm_executor(cfg: ExecutionConfig, log_dir: Path, job_name: str, *, dependency: str | None = None) -> Any:
    """A submitit ``SlurmExecutor`` configured from ``cfg.slurm`` (logs under ``log_dir``)."""
    import submitit

    s = cfg.slurm
    executor = submitit.SlurmExecutor(folder=log_dir / "%j", max_num_timeout=cfg.max_attempts)
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": s.time_min,
        "signal_delay_s": s.signal_delay_s,
        "array_parallelism": cfg.parallelism or UNLIMITED_ARRAY,
        "setup": list(s.setup),
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **s.extra_sbatch},
    }
    if dependency:  # a failed upstream cancels its dependents instead of leaving them pending forever
        params["additional_parameters"]["kill_on_invalid_dep"] = "yes"
    for key, value in {
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node,
        "mem": _mem(s.mem_gb) if s.mem_gb else None,
        "constraint": s.constraint,
        "dependency": dependency,
    }.items():
        if value is not None:
            params[key] = value
    executor.update_parameters(**params)
    return executor


@dataclass
class Submission:
    """What one call to :func:`submit_arrays` sent: array job ids and the item indices of each task."""

    backend: str
    arrays: list[dict[str, Any]] = field(default_factory=list)  # {"job_id", "tasks": [[item index, ...]]}
    jobs: list[Any] = field(default_factory=list)  # submitit jobs, one per array task (not persisted)

    @property
    def job_ids(self) -> list[str]:
        return [a["job_id"] for a in self.arrays]

    @property
    def sbatch_calls(self) -> int:
        return len(self.arrays)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "arrays": self.arrays}


def submit_arrays(
    runner: Any,
    items: Sequence[Any],
    labels: Sequence[str],
    *,
    cfg: ExecutionConfig,
    log_dir: Path,
    job_name: str,
    dependency: str | None = None,
) -> Submission:
    """Submit ``runner(items_of_pack, labels_of_pack)`` as Slurm job arrays: one sbatch per array.

    Items are packed ``cfg.shards_per_task`` to a task; arrays are split at the cluster's
    ``MaxArraySize``; ``cfg.parallelism`` becomes the ``%P`` throttle of each array.
    """
    executor = slurm_executor(cfg, log_dir, job_name, dependency=dependency)
    submission = Submission("slurm")
    for chunk in split(pack(len(items), cfg.shards_per_task), max_array_size(cfg)):
        with executor.batch():
            jobs = [executor.submit(runner, [items[i] for i in task], [labels[i] for i in task]) for task in chunk]
        array_id = str(jobs[0].job_id).split("_")[0]
        submission.arrays.append({"job_id": array_id, "tasks": chunk})
        submission.jobs.extend(jobs)
    return submission


def submit_job(
    fn: Any, *args: Any, cfg: ExecutionConfig, log_dir: Path, job_name: str, dependency: str | None = None
) -> str:
    """Submit ``fn(*args)`` as one Slurm job (e.g. a stage coordinator); returns its job id."""
    executor = slurm_executor(cfg, log_dir, job_name, dependency=dependency)
    return str(executor.submit(fn, *args).job_id)


def submit_script(script: str, path: Path, dependency: str | None = None) -> str:
    """Write an sbatch script to ``path`` (kept next to the run's logs) and submit it; returns the job id.

    ``dependency`` (e.g. ``afterok:12:13``) holds the job until those finish; a failed one cancels it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script, encoding="utf-8")
    deps = [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency else []
    return _slurm("sbatch", "--parsable", *deps, str(path)).strip().split(";")[0]


def queue_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Live Slurm state of every task of the given (array) jobs: ``{"123_4": "RUNNING", ...}``.

    Jobs that left the queue are absent. Needs no accounting database (uses ``squeue``).
    """
    if not job_ids:
        return {}
    out = _slurm("squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids))
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def wait_for_jobs(job_ids: Sequence[str], *, poll_s: float = 2.0, on_poll: Any = None) -> None:
    """Block until none of ``job_ids`` is in the Slurm queue any more."""
    while True:
        try:
            left = queue_states(job_ids)
        except IptError as exc:  # a transient slurmctld hiccup must not kill a long wait
            if "Invalid job id" in str(exc):
                return
            left = {"?": str(exc)}
        if on_poll:
            on_poll()
        if not left:
            return
        time.sleep(poll_s)


def local_executor(cfg: ExecutionConfig, log_dir: Path) -> Any:
    import submitit

    executor = submitit.LocalExecutor(folder=log_dir / "%j", max_num_timeout=cfg.max_attempts)
    executor.update_parameters(timeout_min=cfg.timeout_min)
    return executor
