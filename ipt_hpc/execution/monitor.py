"""Where each shard of a stage stands: per stage, shards done / running / pending / failed / never submitted, with
records, tokens, throughput and ETA — from completion markers plus the Slurm queue.

A shard's state, in order of precedence:
* ``done``: it has a completion marker;
* ``running``: a task is working on it (running marker, and its job is alive);
* ``pending``: it was submitted and its job (or an earlier shard of its pack) is still queued or
  running, or it was requeued after a preemption;
* ``failed``: it has a failure marker, or its job left the queue without finishing it (``lost``);
* ``never submitted``: none of the above.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..layout import state_dir
from . import backends
from .state import StageState, shard_name, stage_label, wall_span

STATES = ("done", "running", "pending", "failed", "never_submitted")
ALIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def _pid_alive(host: str | None, pid: int | None) -> bool | None:
    """Whether a local process lives (None when it ran on another host: unknown)."""
    import socket

    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_keys(submissions: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """The latest submission of each shard: {name: {"backend", "job" | "pid", "host"}}."""
    latest: dict[str, dict[str, Any]] = {}
    for sub in submissions:
        if sub["backend"] == "slurm":
            for array in sub["arrays"]:
                single = len(array["tasks"]) == 1
                for t, task in enumerate(array["tasks"]):
                    key = array["job_id"] if single else f"{array['job_id']}_{t}"
                    for k in task:
                        latest[names[k]] = {"backend": "slurm", "job": key}
        else:
            for k in sub["shards"]:
                latest[names[k]] = {
                    "backend": sub["backend"],
                    "pid": None if "ended" in sub else sub.get("pid"),
                    "host": sub.get("host"),
                }
    return latest


def _started(state: StageState, name: str) -> bool:
    return any(e["event"] == "start" for e in state.events(name))


def resume_command(stage_dir: str | os.PathLike[str]) -> str:
    """The command that redoes a stage's failed shards (done shards are kept)."""
    import shlex

    from ..atomic import read_json

    path = state_dir(stage_dir) / "stage-run.json"
    run = read_json(path) if path.exists() else None
    if run is None or run["stage"] == "shard":  # shard selects no shards: a rerun resumes it
        return "rerun the same command (done shards are kept)"
    words = ["python", "-m", "ipt_hpc.launch", run["stage"], "--run", run["run_dir"]]
    if run["stage"] == "tokenize":
        group = Path(run["out_folder"]).name
        words += ["--input-stage", run["in_folder"], "--group", group]
        record_group = (run.get("stage_config") or {}).get("record_group")
        if record_group:
            words += ["--record-group", record_group]
    return shlex.join([*words, "--shards", "failed"]) + " (with the run's --config/--set)"


def stage_status(stage_dir: str | os.PathLike[str], *, use_queue: bool = True) -> dict[str, Any]:
    """Status of one stage folder as plain data (``--json`` prints exactly this)."""
    state = StageState(stage_dir)
    info = state.read_stage()
    if info is None:
        raise FileNotFoundError(f"{stage_dir}: not a stage folder (no _state/stage.json)")
    n = info["num_shards"]
    names = [shard_name(k, n) for k in range(n)]
    done, failed, running = state.names("done"), state.names("failed"), state.names("running")
    jobs = _job_keys(state.submissions(), names)
    slurm_ids = sorted({j["job"].split("_")[0] for j in jobs.values() if j["backend"] == "slurm"})
    queue: dict[str, str] = {}
    queue_error = None
    if slurm_ids and use_queue:
        try:
            queue = backends.queue_states(slurm_ids) if backends.slurm_available() else {}
        except Exception as exc:  # noqa: BLE001 - status must work without a reachable slurmctld
            queue_error = str(exc)

    def job_state(name: str) -> str | None:
        job = jobs.get(name)
        if job is None:
            return None
        if job["backend"] == "slurm":
            return queue.get(job["job"], "GONE")
        if job.get("pid") is None:
            return "GONE"  # that blocking run is over
        alive = _pid_alive(job.get("host"), job.get("pid"))
        return "RUNNING" if alive or alive is None else "GONE"

    states: dict[str, str] = {}
    lost: list[str] = []
    for name in names:
        if name in done:
            states[name] = "done"
            continue
        js = job_state(name)
        if name in running:
            marker = state.read("running", name) or {}
            if js in ALIVE:
                states[name] = "running"
            elif js == "PENDING" or (js is None and _pid_alive(marker.get("host"), marker.get("pid"))):
                states[name] = "pending" if js == "PENDING" else "running"
            else:
                states[name] = "failed"
                lost.append(name)
        elif js is not None and js != "GONE":
            states[name] = "pending"
        elif name in failed:
            states[name] = "failed"
        elif js == "GONE":
            states[name] = "failed"
            lost.append(name)
        else:
            states[name] = "never_submitted"
    counts = Counter(states.values())
    markers = [state.read("done", name) or {} for name in done]
    records = sum(int(m.get("records", 0)) for m in markers)
    tokens = sum(int(m.get("tokens", 0)) for m in markers)
    in_flight = 0
    for name in running:
        if states.get(name) == "running":
            m = state.read("running", name) or {}
            in_flight += int(m.get("records", 0))
    wall = wall_span(markers) or 0.0
    remaining = n - counts["done"]
    eta = None
    if counts["done"] and wall > 0 and remaining:
        per_shard_wall = wall / counts["done"]  # observed completion rate, concurrency included
        eta = round(per_shard_wall * remaining, 1)
    failures: dict[str, str] = {}
    logs: dict[str, str] = {}
    for name in sorted(failed)[:20]:
        m = state.read("failed", name) or {}
        failures[name] = ((m.get("error") or "").strip().splitlines() or [""])[-1]
        if m.get("log"):
            logs[name] = m["log"]
    started = set(failed)  # failed markers are written by a running task; lost shards: their attempt log says
    for name in lost[:20]:
        if _started(state, name):
            started.add(name)
        failures.setdefault(
            name,
            "job left the queue without finishing this shard (killed or node failure?)"
            if name in started
            else "never started: its job left the queue first (cancelled because an earlier step failed?)",
        )
    return {
        "stage": info["stage"],
        "name": stage_label(info["stage"], stage_dir),
        "folder": str(Path(stage_dir)),
        "num_shards": n,
        "counts": {s: counts.get(s, 0) for s in STATES},
        "records": records + in_flight,
        "tokens": tokens,
        "records_per_s": round(records / wall, 2) if wall > 0 else None,
        "eta_s": eta,
        "complete": counts["done"] == n,
        "failures": failures,
        "failure_logs": logs,
        "started_failures": sorted(n for n in failures if n in started),
        "queue_error": queue_error,
        "held_jobs": sorted(
            {j["job"] for j in jobs.values() if j["backend"] == "slurm" and queue.get(j["job"]) == "HELD"}
        ),
        "shards": states,
    }
