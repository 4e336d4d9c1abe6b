"""Benchmark the fan-out: submitting 10,000 shards and ``status`` over them, against the naive way
(one submitit job per shard, one ``squeue`` per job), on a real Slurm (``tools/local-slurm up``).

    python tools/bench_fanout.py --shards 10000 --naive-sample 200

Jobs are submitted *held* (``--hold``) and cancelled at the end: nothing runs. ``sbatch`` calls are
counted by a logging shim put first on PATH. The naive submission and the naive status are timed on
``--naive-sample`` shards and scaled linearly to ``--shards`` (marked "extrapolated"). For ``status``
the shards are put in mixed states: 60% done, 5% failed, 1% running (this process), 34% pending
in the held arrays.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipt_hpc.atomic import write_json_atomic  # noqa: E402
from ipt_hpc.config import load_config  # noqa: E402
from ipt_hpc.execution import StageRun, StageState, launch, shard_name  # noqa: E402
from ipt_hpc.execution.backends import cluster_max_array_size, slurm_executor  # noqa: E402
from ipt_hpc.execution.monitor import stage_status  # noqa: E402


def noop(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Never runs (the jobs are held and cancelled)."""
    raise RuntimeError("benchmark jobs must not run")


def sbatch_shim(folder: Path) -> Path:
    """An ``sbatch`` that appends one line per call to a log, then runs the real one."""
    real = shutil.which("sbatch")
    if real is None:
        sys.exit("sbatch not found: start the local cluster with tools/local-slurm up")
    log = folder / "sbatch-calls.log"
    shim = folder / "bin" / "sbatch"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\necho call >> "{log}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    os.environ["PATH"] = f"{shim.parent}{os.pathsep}{os.environ['PATH']}"
    return log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def execution() -> Any:
    return load_config(
        None,
        None,
        {"execution.backend": "slurm", "execution.slurm.extra_sbatch": {"hold": True, "job_name": "ipt-bench"}},
    ).execution


def complete_input(run: Path, n: int) -> None:
    """``run/raw`` as a finished input stage leaves it (its stage record and manifest), so the launch's input
    check passes at once, as it does for a stage whose input stage is done; the shards' files are never read."""
    raw = run / "raw"
    StageState(raw).write_stage({"stage": "shard", "num_shards": n, "config_hash": "bench"})
    write_json_atomic(raw / "manifest.json", {"stage": "shard", "num_shards": n, "bench": True})


def bench_ours(run: Path, n: int, log: Path) -> dict[str, Any]:
    complete_input(run, n)
    stage = StageRun("bench", str(run), "bench", "raw", n, noop, {})
    before = calls(log)
    t = time.perf_counter()
    result = launch(stage, "all", execution())
    return {"seconds": time.perf_counter() - t, "sbatch": calls(log) - before, "job_ids": result["job_ids"]}


def bench_naive(folder: Path, sample: int, log: Path) -> dict[str, Any]:
    executor = slurm_executor(execution(), folder / "naive-logs", "ipt-bench")
    before = calls(log)
    t = time.perf_counter()
    jobs = [executor.submit(noop, i, None) for i in range(sample)]
    return {"seconds": time.perf_counter() - t, "sbatch": calls(log) - before, "job_ids": [j.job_id for j in jobs]}


def mix_states(stage_dir: Path, n: int) -> None:
    """60% done, 5% failed (an ended local run), 1% running (a live local run: this process);
    the rest stay pending in the held arrays."""
    state = StageState(stage_dir)
    now = time.time()
    failed, running = [], []
    for k in range(n):
        name = shard_name(k, n)
        r = k % 100
        if r < 60:
            stats = {"records": 1000, "tokens": 250_000, "seconds": 60.0, "finished": now - (n - k)}
            write_json_atomic(state.marker("done", name), stats)
        elif r < 65:
            write_json_atomic(state.marker("failed", name), {"error": "RuntimeError: boom", "attempt": 1})
            failed.append(k)
        elif r < 66:
            state.mark_running(name, {"pid": os.getpid(), "host": os.uname().nodename, "records": 10})
            running.append(k)
    state.end_submission(state.record_submission({"backend": "local", "shards": failed, "pid": os.getpid()}))
    state.record_submission({"backend": "local", "shards": running, "pid": os.getpid()})


def best(fn: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def naive_status(job_ids: list[str]) -> float:
    t = time.perf_counter()
    for job in job_ids:
        subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, check=False)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--naive-sample", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="status runs; the best is shown")
    args = parser.parse_args()
    n, sample = args.shards, args.naive_sample
    folder = Path(tempfile.mkdtemp(prefix="bench_fanout_"))
    log = sbatch_shim(folder)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"cluster MaxArraySize: {cluster_max_array_size()}; scratch: {folder}")
    all_ids: list[str] = []
    try:
        ours = bench_ours(folder / "run", n, log)
        all_ids += ours["job_ids"]
        naive = bench_naive(folder, sample, log)
        all_ids += naive["job_ids"]
        scale = n / sample
        stage_dir = folder / "run" / "bench"
        mix_states(stage_dir, n)
        status_s, report = best(lambda: stage_status(stage_dir), args.repeat)
        naive_status_s = naive_status(naive["job_ids"]) * scale
        limit = -(-n // cluster_max_array_size())
        rows = [
            ("submit: ours (job arrays)", ours["seconds"], ours["sbatch"], ""),
            ("submit: one submitit job per shard", naive["seconds"] * scale, int(naive["sbatch"] * scale), "extrap."),
            ("status: ours (markers + 1 squeue)", status_s, None, ""),
            ("status: one squeue per shard", naive_status_s, None, "extrap."),
        ]
        print(f"\n{n:,} shards; naive measured on {sample} and scaled x{scale:g}")
        print(f"{'':40} {'seconds':>9} {'sbatch calls':>13} {'vs ours':>8}")
        for i, (label, sec, nsb, note) in enumerate(rows):
            ref = rows[0][1] if i < 2 else rows[2][1]
            sb = "" if nsb is None else f"{nsb:,}"
            print(f"{label:40} {sec:9.3f} {sb:>13} {sec / ref:7.1f}x {note}")
        print(f"\nstatus counts: {report['counts']}")
        ok_submit = ours["seconds"] < 5 and ours["sbatch"] <= limit
        print(f"target: submit {n:,} in < 5 s with <= {limit} sbatch calls: {'met' if ok_submit else 'MISSED'}")
        print(f"target: status over {n:,} shards in < 1 s: {'met' if status_s < 1 else 'MISSED'}")
    finally:
        for i in range(0, len(all_ids), 500):
            subprocess.run(["scancel", *all_ids[i : i + 500]], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
