"""A bounded chaos loop for the Slurm drill: while a pipeline runs on the local cluster, it picks a
random running task every few seconds and SIGKILLs it, requeues it (``scontrol requeue``) or sends it
the warning signal, and once sets the node DOWN and back to RESUME. It stops by itself after
``max_actions`` actions (or when told), and counts what it did.

Targets are the array tasks of the per-shard stages and the training job (``ipt-train``). The small
coordinator jobs (shard, mixture, export, eval, report) are left alone: see docs/execution.md.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

TARGETS = ("ipt-synthesize", "ipt-templify", "ipt-tokenize", "ipt-train")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def running_targets() -> list[tuple[str, str]]:
    """``(job id, job name)`` of the running jobs the drill may hit."""
    out = _run("squeue", "-h", "-t", "RUNNING", "-o", "%i %j").stdout
    jobs = [tuple(line.split(maxsplit=1)) for line in out.splitlines() if line.strip()]
    return [(j, n) for j, n in jobs if n.startswith(TARGETS)]  # type: ignore[misc]


def _stage(job_name: str) -> str:
    return job_name.removeprefix("ipt-")


@dataclass
class Chaos:
    node: str
    seed: int = 0
    max_actions: int = 16
    max_kills: int = 2
    interval_s: tuple[float, float] = (2.0, 6.0)
    counts: Counter[str] = field(default_factory=Counter)
    stages: list[str] = field(default_factory=list)  # the job name of each action's target
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos", daemon=True)

    def start(self) -> Chaos:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _loop(self) -> None:
        rng = random.Random(self.seed)
        node_down_done = False
        actions = 0
        while actions < self.max_actions and not self._stop.wait(rng.uniform(*self.interval_s)):
            targets = running_targets()
            if not targets:
                continue
            hits = Counter(self.stages)  # spread the actions: the stage hit least so far first
            least = min(hits[_stage(n)] for _, n in targets)
            job, name = rng.choice([t for t in targets if hits[_stage(t[1])] == least])
            self.stages.append(_stage(name))
            choices = ["requeue", "warn", "warn", "requeue"]
            if self.counts["kill"] < self.max_kills:
                choices.append("kill")
            if not node_down_done and actions >= 3:
                choices.append("node")
            action = rng.choice(choices)
            actions += 1
            self.counts[action] += 1
            if action == "requeue":
                res = _run("scontrol", "requeue", job)
            elif action == "warn":  # the training job's script traps USR1; submitit's tasks handle USR2
                res = (
                    _run("scancel", "--batch", "--signal=USR1", job)
                    if name.startswith("ipt-train")
                    else _run("scancel", "--signal=USR2", job)
                )
            elif action == "kill":
                res = _run("scancel", "--signal=KILL", job)
            else:
                node_down_done = True
                res = _run("scontrol", "update", f"nodename={self.node}", "state=down", "reason=ipt-chaos-drill")
                time.sleep(10)  # the killed jobs' processes are gone before the node takes new ones
                _run("scontrol", "update", f"nodename={self.node}", "state=resume")  # refused if already back
            self.log.append(
                f"{time.strftime('%H:%M:%S')} {action} {job} ({name}): rc {res.returncode} {res.stderr.strip()}"
            )
        self.counts["stopped_after"] = actions
