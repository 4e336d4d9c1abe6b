"""sbatch scripts for users who submit by hand, and the per-shard entry point they call.

Two ways to submit a per-shard stage by hand, both ending in ``python -m ipt_hpc.launch run-shard``,
the same :class:`ShardRunner` the submitit path runs:

* ``slurm/stage-array.sbatch``: a fixed script taking the stage folder as an argument
  (``sbatch --array=0-999%64 slurm/stage-array.sbatch RUN/synth``);
* :func:`render`: a script with the run's Slurm settings (partition, time, GPUs, setup lines...)
  baked in. Every substituted value is shell-quoted; ``#SBATCH`` values may not hold newlines.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import ExecutionConfig
from ..errors import IptError
from ..layout import RunLayout, state_dir
from .backends import slurm_mem
from .shards import ShardRunner
from .submit import load_stage_run

SIGNAL_SPEC = "B:USR2@{delay}"


_PLAIN = re.compile(r"^[A-Za-z0-9_.,:/=%@+\-\[\]]+$")


def _value(key: str, value: object) -> str:
    """Quote a value for an ``#SBATCH`` line, which sbatch parses itself (not the shell):
    double quotes group, a backslash escapes the next character, an unquoted ``#`` starts a comment."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise IptError(f"sbatch option {key!r}: value may not contain a newline: {text!r}")
    if _PLAIN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cluster_options(s: Any) -> dict[str, Any]:
    """The ``#SBATCH`` options every job of a run shares, from the ``execution.slurm`` section."""
    return {
        "time": s.time_min,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "cpus-per-task": s.cpus_per_task,
        "gpus-per-node": s.gpus_per_node,
        "mem": slurm_mem(s.mem_gb) if s.mem_gb else None,
        "constraint": s.constraint,
        **{k.replace("_", "-"): v for k, v in s.extra_sbatch.items()},
    }


def sbatch_lines(options: dict[str, Any]) -> list[str]:
    """``#SBATCH --key=value`` lines (values quoted the way sbatch parses them); None/False are left out."""
    return [
        f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={_value(key, value)}"
        for key, value in options.items()
        if value is not None and value is not False
    ]


def render(
    stage_dir: str | os.PathLike[str], cfg: ExecutionConfig, *, array: str | None = None, python: str | None = None
) -> str:
    """A complete sbatch script running ``run-shard`` for each array task of ``array`` (default: every task of
    the stage, ``cfg.shards_per_task`` shards each, at most ``cfg.parallelism`` at a time)."""
    run = load_stage_run(stage_dir)
    if array is None:
        tasks = -(-run.num_shards // cfg.shards_per_task)
        array = f"0-{tasks - 1}" + (f"%{cfg.parallelism}" if cfg.parallelism else "")
    logs = state_dir(Path(stage_dir).resolve()) / "logs"
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    s = cfg.slurm
    options: dict[str, Any] = {
        "job-name": f"ipt-{run.stage}",
        "array": array,
        "requeue": True,
        "signal": SIGNAL_SPEC.format(delay=s.signal_delay_s),
        "open-mode": "append",
        "output": str(logs / "sbatch-%A_%a.out"),
        **cluster_options(s),
    }
    lines = ["#!/bin/bash", f"# ipt_hpc {run.stage}: {run.num_shards} shards of {run.out_dir}"]
    lines += sbatch_lines(options)
    lines += ["", "set -euo pipefail"]
    lines += list(s.setup)
    command = [
        shlex.quote(python or sys.executable),
        "-m ipt_hpc.launch run-shard --stage-dir",
        shlex.quote(str(Path(stage_dir).resolve())),
        '--task-index "${SLURM_ARRAY_TASK_ID:-0}" --shards-per-task',
        str(int(cfg.shards_per_task)),
    ]
    lines += ["exec " + " ".join(command), ""]
    return "\n".join(lines)


def _requeue_this_job() -> None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)


def run_shards(stage_dir: str | os.PathLike[str], task_index: int, per_task: int = 1, offset: int = 0) -> int:
    """Entry point of hand-submitted array tasks: run shards ``offset + task_index*per_task + j``.

    On USR2 (``--signal=B:USR2@...``) progress is made durable and the job requeues itself; on
    SIGTERM progress is made durable. Returns the process exit code (1 if a shard failed).
    """
    run = load_stage_run(stage_dir)
    first = offset + task_index * per_task
    shards = [k for k in range(first, first + per_task) if k < run.num_shards]
    if not shards:
        print(f"run-shard: task {task_index} has no shard (stage has {run.num_shards})", file=sys.stderr)
        return 0
    runner = ShardRunner(run)

    def on_usr2(signum: int, frame: Any) -> None:
        runner.on_preempt()
        _requeue_this_job()
        sys.exit(0)

    signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGTERM, lambda signum, frame: runner.on_preempt())
    failed = 0
    for k in shards:
        try:
            stats = runner(k)
            print(f"run-shard: shard {k} done ({stats.get('records', '?')} records)", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - reported, the next shard of the pack still runs
            failed += 1
            print(f"run-shard: shard {k} failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


TRAIN_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


def render_train(
    run_dir: str | os.PathLike[str],
    cfg: ExecutionConfig,
    *,
    nodes: int,
    ranks_per_node: int,
    signal_name: str,
    signal_delay_s: int,
    args: list[str],
    python: str | None = None,
) -> str:
    """``slurm/train.sbatch`` with this run's ``#SBATCH`` options, setup lines and arguments baked in.

    The template's own ``#SBATCH`` defaults are replaced; its body (rendezvous, NCCL settings, signal
    forwarding, requeue on exit code 75) is kept as is. Every substituted value is quoted.
    """
    try:
        template = TRAIN_TEMPLATE.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise IptError(f"{TRAIN_TEMPLATE}: cannot read the training job template ({exc.strerror})") from exc
    last = max(i for i, line in enumerate(template) if line.startswith("#SBATCH"))
    logs = RunLayout.of(Path(run_dir).resolve()).train / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    s = cfg.slurm
    options: dict[str, Any] = {
        "job-name": "ipt-train",
        "nodes": nodes,
        "ntasks-per-node": ranks_per_node,
        "requeue": True,
        "signal": f"B:{signal_name}@{signal_delay_s}",
        "open-mode": "append",
        "output": str(logs / "slurm-%j.out"),
        **cluster_options(s),
    }
    lines = ["#!/bin/bash", f"# ipt_hpc train of {Path(run_dir).resolve()}: rendered from slurm/train.sbatch"]
    lines += sbatch_lines(options)
    lines += list(s.setup)
    lines.append(f"export IPT_PYTHON={shlex.quote(python or sys.executable)}")
    lines.append(f"export IPT_TRAIN_SIGNAL={shlex.quote(signal_name)}")
    lines.append("set -- " + " ".join(shlex.quote(a) for a in [str(Path(run_dir).resolve()), *args]))
    return "\n".join(lines + template[last + 1 :]) + "\n"
