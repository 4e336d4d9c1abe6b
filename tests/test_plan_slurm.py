"""``plan`` on the local Slurm cluster (tools/local-slurm up): a 10,000-shard plan that submits nothing, and the
calibration as one job on the partition. Apart from test_plan.py so that its CPU-bound tests run on another
pytest-xdist worker while these wait in the Slurm tests' queue (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from conftest import make_docs, run_cli, write_jsonl
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster
from test_plan import calibrate, corpus_sets, small_pipeline

from ipt_hpc.atomic import read_json

pytestmark = pytest.mark.slurm


def _my_jobs() -> int:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return len(out.split())


def test_plan_of_10000_shards_on_slurm_submits_nothing(tmp_path: Path) -> None:
    from ipt_hpc.execution.backends import cluster_max_array_size

    args = small_pipeline(tmp_path)
    run = tmp_path / "run"
    calibrate(run, args)  # on the local executor: what the Slurm plan scales
    before = _my_jobs()
    submissions = sorted(run.glob("*/_state/submissions/*"))
    proc = run_cli(
        "plan", "--run", str(run), "--json", *args, "--executor", "slurm", "--set", "shard.num_shards=10000",
        "--parallelism", "64", "--set", "execution.slurm.time_min=30",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    limit = cluster_max_array_size()
    synth = next(s for s in plan["stages"] if s["stage"] == "synthesize")["layout"]
    assert plan["max_array_size"] == limit and synth["shards"] == 10_000 and synth["throttle"] == 64
    assert synth["arrays"] == math.ceil(synth["tasks"] / limit) == synth["sbatch_calls"]
    assert synth["tasks"] == math.ceil(10_000 / synth["shards_per_task"])
    assert synth["task_min"] <= 30 * 0.75 or not synth["fits"]
    assert _my_jobs() == before and sorted(run.glob("*/_state/submissions/*")) == submissions
    assert not (run / "raw").exists()  # planned, nothing ran
    assert re.search(r"not included", plan["queue_wait"])  # the plan says what it leaves out


def test_calibration_runs_as_one_job_on_the_partition(tmp_path: Path) -> None:
    """On Slurm the calibration is one job on the target partition; its figures come back to the plan."""
    from tokenizer_fixture import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    inp = write_jsonl(tmp_path / "in.jsonl", make_docs(30, seed=9, max_words=40))
    args = corpus_sets(inp, shard__num_shards=6, tokenize__tokenizer=tok)
    run = tmp_path / "run"
    proc = run_cli("plan", "--run", str(run), "--calibrate", "10", "--executor", "slurm", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    assert "calibration: Slurm job" in proc.stderr
    cal = read_json(run / "_state" / "plan" / "calibration.json")
    assert cal["executor"].startswith("slurm: one job") and cal["concurrency"] == 1  # one task's worth
    assert list(cal["stages"]) == ["shard", "tokenize raw"]
    plan = json.loads(proc.stdout)
    assert plan["backend"] == "slurm" and plan["stages"][1]["layout"]["shards"] == 6
    assert list((run / "_state" / "logs" / "calibration").rglob("*.out"))  # the job's own log
