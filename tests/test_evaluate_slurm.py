"""``eval --executor slurm`` on the local Slurm cluster (tools/local-slurm up): one job through the execution
layer's ``submit_job`` runs lm-eval on the tiny model and writes the results into the run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli
from test_evaluate import model_dir, task_dir  # noqa: F401 - module fixtures
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster

from ipt_hpc.execution.backends import wait_for_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_eval_as_one_slurm_job(model_dir: Path, task_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model_dir), "--tasks", "tiny_mc", "--num-fewshot", "2"]
    args += ["--include-path", str(task_dir), "--dtype", "float32", "--device", "cpu", "--limit", "12"]
    args += ["--out", str(out), "--executor", "slurm", "--set", "execution.slurm.gpus_per_node=0"]
    args += ["--set", "execution.slurm.time_min=10"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted Slurm job (\d+)", proc.stderr)
    assert job, proc.stderr
    wait_for_jobs([job.group(1)], poll_s=1.0)
    logs = "".join(p.read_text(errors="replace") for p in (out / "_state" / "logs").rglob("*.out"))
    assert (out / "tasks.json").exists(), logs[-3000:]
    res = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    assert res["results"]["tiny_mc"]["sample_len"] == 12
    assert res["config"]["model_args"]["add_bos_token"] is True
    assert "| tiny_mc | tiny_mc | 2 |" in (out / "results.md").read_text(encoding="utf-8")
