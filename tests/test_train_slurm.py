"""The train stage on the local Slurm cluster (tools/local-slurm up): a 2-rank job submitted with
``launch train --executor slurm`` gets the warning signal mid-run (as ``--signal=B:USR1@...`` would send it),
saves, requeues itself, resumes, and ends with the same losses as an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster
from test_train import REPO, SMALL, TINY, _env, events, finish, losses, new_run, start

from ipt_hpc.model.train.metrics import read_steps

pytestmark = pytest.mark.slurm


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def _slurm_log(run: Path) -> str:
    return "".join(p.read_text() for p in (run / "train" / "logs").glob("slurm-*.out"))


def test_slurm_job_resumes_after_the_warning_signal_to_the_same_losses(tmp_path: Path) -> None:
    reference = new_run(tmp_path, "ref")
    assert finish(start(reference, 2)) == 0  # uninterrupted, same DP=2 layout as the job
    run = new_run(tmp_path, "slurm")
    cmd = [sys.executable, "-m", "ipt_hpc.launch", "train", "--config", str(TINY), "--run", str(run)]
    cmd += ["--executor", "slurm", "--ranks-per-node", "2", "--set", "execution.slurm.time_min=10"]
    cmd += ["--set", "execution.slurm.cpus_per_task=1"]
    for s in SMALL:
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=_env(IPT_TRAIN_TEST_STEP_SLEEP="0.5"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = out.stdout.split("submitted training job ")[1].split(";")[0]
    log = run / "train" / "log.jsonl"
    try:
        deadline = time.time() + 240
        while not (log.exists() and read_steps(log) and max(read_steps(log)) >= 5):
            assert time.time() < deadline, f"job {job} did not reach step 5 ({_job_state(job)})"
            time.sleep(0.5)
        # what Slurm does at --signal=B:USR1@T: signal the batch shell, which forwards it through srun
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        deadline = time.time() + 300
        while not (run / "train" / "done.json").exists():
            state = _job_state(job)
            assert time.time() < deadline and state not in ("FAILED", "CANCELLED", "COMPLETED"), (
                f"job {job} did not finish ({state}):\n{_slurm_log(run)[-3000:]}"
            )
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], check=False, timeout=30)
    names = [e["event"] for e in events(run)]
    assert names[:1] == ["start"] and "exit" in names and "resume" in names and names[-1] == "done", names
    stopped = next(e for e in events(run) if e["event"] == "exit")
    assert stopped["reason"] == "SIGUSR1" and stopped["iteration"] < int(SMALL[2].split("=")[1])
    assert losses(run) == losses(reference)  # step for step, so the final loss too
    slurm_log = _slurm_log(run)
    assert "requeueing job" in slurm_log and "restart 1" in slurm_log, slurm_log[-3000:]
    assert str(REPO)  # the job ran this checkout (PYTHONPATH is passed through sbatch's environment)
