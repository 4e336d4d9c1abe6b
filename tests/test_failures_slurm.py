"""Failures on the real local Slurm cluster (tools/local-slurm up): a failed shard fails its array
task, so ``afterok`` holds the rest of the chain and ``--kill-on-invalid-dep`` cancels it; the end of
``pipeline --wait`` and ``status`` name the root cause first; preflight refuses a request that the
cluster cannot run, before anything is submitted."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from test_failures import SYNTH_FIRST, demo_sets, truncated_raw
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster

from ipt_hpc.execution import StageState, shard_name
from ipt_hpc.execution.backends import queue_states
from ipt_hpc.execution.monitor import stage_status

pytestmark = pytest.mark.slurm

SLURM = ["--executor", "slurm", "--set", "execution.slurm.time_min=20"]


def test_truncated_shard_stops_the_slurm_chain_with_the_root_cause_first(tmp_path: Path, tiny_synth: Path) -> None:
    run = tmp_path / "run"
    bad = truncated_raw(run)
    proc = run_cli("pipeline", "--run", str(run), *demo_sets(tiny_synth), *SYNTH_FIRST, *SLURM, "--wait")
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "pipeline failed after" in err
    first = err.index("first failure: synthesize shard-00002.jsonl.zst: ")
    assert (
        err[first:].splitlines()[0].endswith(f"{bad}: corrupt or truncated zstd data (truncated zstd frame at byte 0)")
    )
    assert f"  resume: python -m ipt_hpc.launch synthesize --run {run} --shards failed" in err
    assert first < err.index("templify 4 shards") < err.index("tokenize augmented 4 shards")
    assert "never started" in err[err.index("templify 4 shards") :].splitlines()[0]
    synth = stage_status(run / "synth")
    assert synth["counts"]["done"] == 3 and synth["counts"]["failed"] == 1
    for folder in ("augmented", "tokens/augmented", "tokens/raw"):  # held by afterok, then cancelled
        state = StageState(run / folder)
        assert all(not state.events(shard_name(k, 4)) for k in range(4)), f"a {folder} task started"
        assert not list((run / folder).glob("shard-*"))
    assert not (run / "train" / "log.jsonl").exists() and not (run / "mixture.json").exists()
    jobs = [j for sub in StageState(run / "synth").submissions() for j in (a["job_id"] for a in sub["arrays"])]
    assert jobs and not queue_states(jobs)


def test_preflight_refuses_what_the_cluster_cannot_run(tmp_path: Path, tiny_synth: Path) -> None:
    from test_fanout import make_raw

    run = make_raw(tmp_path / "run", 2)
    before = set(queue_states_all())
    sets = ["--set", "execution.slurm.gpus_per_node=1", "--set", "execution.slurm.mem_gb=100000"]
    proc = run_cli("synthesize", "--run", str(run), "--model", str(tiny_synth), "--executor", "slurm", *sets)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: synthesize: preflight found 2 problem(s); nothing was submitted")
    assert lines[1].startswith("  - execution.slurm.mem_gb=100000.0: 100000.0 GB, but partition debug's nodes have")
    assert lines[2].startswith(
        "  - execution.slurm.gpus_per_node=1: 1 GPU(s) per node, but partition debug has no GPUs"
    )
    assert set(queue_states_all()) == before and not (run / "synth").exists()
    proc = run_cli("synthesize", "--run", str(run), "--model", str(tiny_synth), "--executor", "slurm", "--dry-run",
                   "--partition", "nope")  # fmt: skip
    assert proc.returncode == 2 and "execution.slurm.partition=nope: no partition 'nope' (sinfo lists: debug" in (
        proc.stderr
    )


def queue_states_all() -> list[str]:
    import subprocess

    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return out.split()


def test_waiting_on_a_held_job_stops_with_the_release_command(tmp_path: Path) -> None:
    """A job Slurm holds never leaves the queue by itself: --wait says so instead of waiting forever."""
    import subprocess

    from test_fanout import execution, make_raw, stage

    from ipt_hpc.execution import launch
    from ipt_hpc.execution.backends import JobsHeld

    run = make_raw(tmp_path / "run", 2)
    cfg = execution(backend="slurm", **{"slurm.time_min": 5, "slurm.extra_sbatch": {"hold": True}})
    try:
        with pytest.raises(JobsHeld, match=r"Slurm holds job\(s\) \d+_0 \d+_1 \(JobHeldUser.*scontrol release"):
            launch(stage(run, 2), "all", cfg, wait=True)
        st = stage_status(run / "upper")
        assert st["counts"]["pending"] == 2 and len(st["held_jobs"]) == 2
        proc = run_cli("status", "--run", str(run))
        assert "upper: Slurm holds job(s)" in proc.stdout and "scontrol release" in proc.stdout
    finally:
        subprocess.run(["scancel", "--name=ipt-upper"], capture_output=True, check=False)
