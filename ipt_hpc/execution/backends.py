"""Backends: submitit executors for ``local`` and ``slurm``, array splitting, queue queries.

This is the only module that builds submitit executors or runs Slurm commands.
"""

from __future__ import annotations

import functools
import math
import os
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


def slurm_mem(gb: float) -> str:
    """``--mem`` for ``gb`` GiB, in whole MiB rounded up (a request never falls below what was asked)."""
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
        "mem": slurm_mem(s.mem_gb) if s.mem_gb else None,
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

    A pending job that Slurm or a user holds (reason ``launch_failed_requeued_held``, ``JobHeldUser``,
    ``JobHeldAdmin``) is ``HELD``: it will not run until released. Jobs that left the queue are absent.
    Needs no accounting database (uses ``squeue``).
    """
    return {job: state for job, (state, _) in queue_details(job_ids).items()}


def queue_details(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{"123_4": (state, reason), ...}`` of :func:`queue_states`."""
    if not job_ids:
        return {}
    out = _slurm("squeue", "-h", "-r", "-o", "%i %T %r", "-j", ",".join(job_ids))
    states = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2:
            reason = parts[2] if len(parts) == 3 else ""
            held = parts[1] == "PENDING" and "held" in reason.lower()
            states[parts[0]] = ("HELD" if held else parts[1], reason)
    return states


class JobsHeld(IptError):
    """Jobs waited for are held by Slurm: they will not run until released."""

    def __init__(self, held: dict[str, str]) -> None:
        self.held = held
        jobs = " ".join(sorted(held))
        reasons = ", ".join(sorted(set(held.values())))
        super().__init__(
            f"Slurm holds job(s) {jobs} ({reasons}: e.g. a requeued launch failed on a failing node); they stay"
            f" queued but will not run. Release them (scontrol release {jobs.replace(' ', ',')}) and rerun"
            " this command to follow them, or scancel them"
        )


def wait_for_jobs(job_ids: Sequence[str], *, poll_s: float = 2.0, on_poll: Any = None) -> None:
    """Block until none of ``job_ids`` is in the Slurm queue any more; raise :class:`JobsHeld` when
    one of them is held (it would never leave the queue by itself)."""
    while True:
        try:
            left = queue_details(job_ids)
        except IptError as exc:  # a transient slurmctld hiccup must not kill a long wait
            if "Invalid job id" in str(exc):
                return
            left = {"?": (str(exc), "")}
        if on_poll:
            on_poll()
        if not left:
            return
        held = {job: reason for job, (state, reason) in left.items() if state == "HELD"}
        if held:
            raise JobsHeld(held)
        time.sleep(poll_s)


def threads_per_worker(workers: int) -> int:
    """OpenMP threads for each of ``workers`` local processes: this machine's usable CPUs shared out."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))


def local_executor(cfg: ExecutionConfig, log_dir: Path, workers: int = 1) -> Any:
    """A submitit ``LocalExecutor`` for ``workers`` concurrent jobs. Each gets its share of the CPUs as
    ``OMP_NUM_THREADS`` (unless the environment sets it): torch would otherwise start one thread per core in
    every job, and on 2 cores two synthesis jobs ran 3.8x slower than with one thread each (docs/execution.md)."""
    import submitit

    executor = submitit.LocalExecutor(folder=log_dir / "%j", max_num_timeout=cfg.max_attempts)
    setup = [] if os.environ.get("OMP_NUM_THREADS") else [f"export OMP_NUM_THREADS={threads_per_worker(workers)}"]
    executor.update_parameters(timeout_min=cfg.timeout_min, setup=setup)
    return executor


def _minutes(limit: str) -> float:
    """A Slurm time limit (``infinite``, ``30``, ``1:00:00``, ``2-12:00:00``) in minutes."""
    if limit.lower() in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:  # minutes
        minutes = float(parts[0])
    else:
        h, m, s = ([0] * (3 - len(parts)) + parts)[-3:]
        minutes = h * 60 + m + s / 60
    return minutes + (int(days) * 24 * 60 if days else 0)


def _gpus(gres: str) -> int:
    """GPUs per node of a Slurm GRES string (``gpu:8``, ``gpu:a100:4(S:0-1)``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total = max(total, int(fields[-1]))
    return total


def slurm_problems(cfg: ExecutionConfig) -> list[tuple[str, str, str]]:
    """Whether ``cfg.slurm``'s request fits the cluster, from one ``sinfo`` call and one ``scontrol``:
    ``[(config key, what is wrong, the fix), ...]``; empty when it fits."""
    s = cfg.slurm
    try:
        rows = _slurm("sinfo", "-h", "-o", "%P|%l|%c|%m|%G|%a").splitlines()
    except IptError as exc:
        return [("execution.backend", str(exc), "start Slurm, or use --executor local")]
    parts: dict[str, dict[str, Any]] = {}
    default = None
    for row in rows:
        name, limit, cpus, mem, gres, avail = row.split("|")
        if name.endswith("*"):
            name = name[:-1]
            default = name
        p = parts.setdefault(name, {"time": 0.0, "cpus": 0, "mem": 0, "gpus": 0, "up": False})
        p["time"] = max(p["time"], _minutes(limit))
        p["cpus"] = max(p["cpus"], int(cpus.rstrip("+") or 0))
        p["mem"] = max(p["mem"], int(mem.rstrip("+") or 0))
        p["gpus"] = max(p["gpus"], _gpus(gres))
        p["up"] = p["up"] or avail == "up"
    name = s.partition or default
    if name is None or name not in parts:
        what = f"no partition {s.partition!r}" if s.partition else "no default partition"
        listed = ", ".join(parts) or "none"
        return [("execution.slurm.partition", f"{what} (sinfo lists: {listed})", "set --partition to one of them")]
    p = parts[name]
    problems: list[tuple[str, str, str]] = []

    def add(key: str, reason: str, fix: str) -> None:
        problems.append((f"execution.slurm.{key}", reason, fix))

    if not p["up"]:
        add("partition", f"partition {name} is not up", "choose another partition")
    if s.time_min > p["time"]:
        add("time_min", f"{s.time_min} min exceeds partition {name}'s limit of {p['time']:.0f} min", "lower it")
    if s.cpus_per_task and s.cpus_per_task > p["cpus"]:
        add("cpus_per_task", f"{s.cpus_per_task} CPUs, but partition {name}'s nodes have {p['cpus']}", "lower it")
    if s.mem_gb and s.mem_gb * 1024 > p["mem"]:
        add("mem_gb", f"{s.mem_gb} GB, but partition {name}'s nodes have {p['mem'] / 1024:.1f} GB", "lower it")
    if s.gpus_per_node and s.gpus_per_node > p["gpus"]:
        have = f"at most {p['gpus']} GPUs per node" if p["gpus"] else "no GPUs (sinfo GRES: none)"
        fix = "choose a GPU partition (--partition) or lower the request"
        add("gpus_per_node", f"{s.gpus_per_node} GPU(s) per node, but partition {name} has {have}", fix)
    if s.account:
        allowed = _partition_field(name, "AllowAccounts")
        if allowed not in (None, "ALL") and s.account not in allowed.split(","):
            add("account", f"partition {name} allows accounts {allowed}, not {s.account}", "use one of those")
        known = _user_accounts()
        if known is not None and s.account not in known:
            listed = ", ".join(sorted(known)) or "none"
            add("account", f"you have no association with account {s.account} (sacctmgr: {listed})", "use one of those")
    return problems


def _partition_field(partition: str, key: str) -> str | None:
    try:
        text = _slurm("scontrol", "show", "partition", partition)
    except IptError:
        return None
    for word in text.split():
        k, _, v = word.partition("=")
        if k == key:
            return v
    return None


def _user_accounts() -> set[str] | None:
    """The accounts of this user from Slurm's accounting database (None where there is none)."""
    import getpass

    if shutil.which("sacctmgr") is None:
        return None
    try:
        out = _slurm("sacctmgr", "-nP", "show", "assoc", f"user={getpass.getuser()}", "format=account")
    except IptError:
        return None  # accounting_storage/none: accounts are not checked by Slurm either
    return {line.strip() for line in out.splitlines() if line.strip()}
