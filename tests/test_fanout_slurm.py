"""The execution layer against the real local Slurm cluster (tools/local-slurm up): a throttled
200-shard array, arrays split at MaxArraySize, preemption by ``scontrol requeue`` and by
``scancel --signal=USR2`` resuming to identical bytes, failed shards found and redone, status."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from test_fanout import execution, make_raw, outputs, reference, stage, wait_until
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster

from ipt_hpc.execution import StageState, launch, shard_name
from ipt_hpc.execution.backends import cluster_max_array_size, queue_states
from ipt_hpc.execution.monitor import stage_status

pytestmark = pytest.mark.slurm


def slurm(**sets):
    return execution(backend="slurm", **{"slurm.time_min": 15, **sets})


@pytest.fixture(autouse=True)
def _cancel_leftovers():
    yield
    subprocess.run(["scancel", "--name=ipt-upper"], check=False, capture_output=True)


def wait_idle(stage_dir: Path, timeout: float) -> dict:
    """Poll status until nothing is pending or running; returns the last status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = stage_status(stage_dir)
        if st["counts"]["pending"] == 0 and st["counts"]["running"] == 0:
            return st
        time.sleep(0.5)
    raise AssertionError(f"stage still busy after {timeout} s: {stage_status(stage_dir)['counts']}")


def test_200_shard_array_with_throttle_each_shard_done_exactly_once(tmp_path: Path) -> None:
    n = 200
    ref = reference(tmp_path, n, docs=400)
    run = make_raw(tmp_path / "run", n, docs=400)
    first = launch(stage(run, n), "0-149", slurm(parallelism=4, shards_per_task=2))
    assert first["submitted"] == 150 and first["sbatch_calls"] == 1
    st = stage_status(run / "upper")
    assert st["counts"]["never_submitted"] == 50
    assert st["counts"]["pending"] + st["counts"]["running"] + st["counts"]["done"] == 150
    second = launch(stage(run, n), "missing", slurm(parallelism=4, shards_per_task=2))
    assert second["submitted"] == 50
    seen: set[str] = set()
    max_running_tasks = 0
    deadline = time.time() + 400
    while time.time() < deadline:
        st = stage_status(run / "upper")
        seen.update(k for k, v in st["counts"].items() if v)
        states = queue_states(first["job_ids"] + second["job_ids"])
        per_array: dict[str, int] = {}
        for key, value in states.items():
            if value == "RUNNING":
                per_array[key.split("_")[0]] = per_array.get(key.split("_")[0], 0) + 1
        max_running_tasks = max([max_running_tasks, *per_array.values()])
        if st["complete"]:
            break
        time.sleep(0.5)
    assert st["complete"], st["counts"]
    assert {"pending", "done"} <= seen
    assert max_running_tasks <= 4, "the %4 throttle was not respected"
    assert outputs(run, n) == ref
    state = StageState(run / "upper")
    for k in range(n):
        assert [e["event"] for e in state.events(shard_name(k, n))] == ["start", "done"]
    assert st["records"] == 400


def test_submission_larger_than_max_array_size_is_split(tmp_path: Path) -> None:
    assert cluster_max_array_size() >= 100  # read from `scontrol show config`
    n = 12
    ref = reference(tmp_path, n)
    run = make_raw(tmp_path / "run", n)
    result = launch(stage(run, n), "all", slurm(max_array_size=5))
    assert result["sbatch_calls"] == 3
    assert len(set(result["job_ids"])) == 3
    st = wait_idle(run / "upper", 180)
    assert st["complete"]
    assert outputs(run, n) == ref


def _running(run: Path, name: str, min_records: int) -> dict | None:
    m = StageState(run / "upper").read("running", name)
    return m if m and m.get("records", 0) >= min_records else None


@pytest.mark.parametrize("how", ["scontrol-requeue", "usr2"])
def test_preempted_task_resumes_to_identical_bytes(tmp_path: Path, how: str) -> None:
    ref = reference(tmp_path, 1, docs=150)
    run = make_raw(tmp_path / "run", 1, docs=150)
    name = shard_name(0, 1)
    launch(stage(run, 1, delay_s=0.05), "all", slurm())
    wait_until(lambda: _running(run, name, 10), 120, "the task to make progress")
    job = _running(run, name, 10)["job"]
    # scancel --signal reaches the job step, where submitit's handler runs
    cmd = ["scontrol", "requeue", job] if how == "scontrol-requeue" else ["scancel", "--signal=USR2", job]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    deadline = time.time() + 240
    while time.time() < deadline and not stage_status(run / "upper")["complete"]:
        time.sleep(0.5)
    assert stage_status(run / "upper")["complete"]
    assert outputs(run, 1) == ref
    events = StageState(run / "upper").events(name)
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 2 and kinds[-1] == "done", kinds
    resumed = next(e for e in events if e["event"] == "resumed")
    assert 10 <= resumed["records"] < 150
    if how == "usr2":
        assert "preempted" in kinds


def test_failed_shard_is_found_and_redone_on_slurm(tmp_path: Path) -> None:
    n = 4
    ref = reference(tmp_path, n)
    run = make_raw(tmp_path / "run", n)
    launch(stage(run, n, fail_shards=[2]), "all", slurm())
    st = wait_idle(run / "upper", 180)
    assert st["counts"]["failed"] == 1 and st["counts"]["done"] == 3
    assert st["shards"][shard_name(2, n)] == "failed"
    assert "deliberate failure of shard 2" in st["failures"][shard_name(2, n)]
    again = launch(stage(run, n, fail_shards=[2]), "failed", slurm())
    assert again["submitted"] == 1
    st = wait_idle(run / "upper", 180)
    assert st["complete"]
    assert outputs(run, n) == ref


@pytest.mark.parametrize("how", ["rendered", "static-template"])
def test_hand_submitted_array_with_nasty_paths(tmp_path: Path, how: str) -> None:
    import sys

    from test_fanout import NASTY

    from ipt_hpc.execution.sbatch import render

    n = 6
    ref = reference(tmp_path, n)
    run = make_raw(tmp_path / NASTY, n)
    launch(stage(run, n), "0", execution(backend="debug"))  # prepare the stage folder
    if how == "rendered":
        cfg = slurm(shards_per_task=2, **{"slurm.extra_sbatch": {"job_name": "ipt-upper"}})
        script = tmp_path / "job.sbatch"
        script.write_text(render(run / "upper", cfg, array="0-2%2"))
        cmd = ["sbatch", "--parsable", str(script)]
    else:
        template = Path(__file__).resolve().parents[1] / "slurm" / "stage-array.sbatch"
        cmd = [
            "sbatch",
            "--parsable",
            "--job-name=ipt-upper",
            f"--output={tmp_path}/o-%A_%a.out",
            "--array=0-4%3",
            str(template),
            str(run / "upper"),
            "1",
            "1",
        ]
    env = {**__import__("os").environ, "IPT_PYTHON": sys.executable}
    job = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.strip()
    deadline = time.time() + 180
    while time.time() < deadline and queue_states([job.split(";")[0]]):
        time.sleep(0.5)
    assert stage_status(run / "upper")["complete"], stage_status(run / "upper")["counts"]
    assert outputs(run, n) == ref
    assert not list(tmp_path.rglob("PWNED"))
    if how == "rendered":  # sbatch parsed the quoted --output path of the #SBATCH line exactly
        assert list((run / "upper" / "_state" / "logs").glob("sbatch-*_*.out"))


def _pipeline_steps(run: Path, n: int, inputs: list[Path]):
    from functools import partial

    from ipt_hpc.config import load_config
    from ipt_hpc.execution import run_stage
    from ipt_hpc.pipeline import Coordinator, ShardStage
    from ipt_hpc.stages import shard

    cfg = load_config(
        None,
        None,
        {
            "shard.inputs": [str(p) for p in inputs],
            "shard.text_field": "content",
            "shard.num_shards": n,
            "execution.backend": "slurm",
            "execution.slurm.time_min": 15,
            "execution.slurm.extra_sbatch": {"job_name": "ipt-upper"},  # so the fixture cancels leftovers
        },
    )
    shard_step = Coordinator("shard", partial(run_stage, wait=True), (shard.STAGE, cfg, str(run)))
    steps = [shard_step, ShardStage(stage(run, n))]
    return steps, cfg.execution


def test_pipeline_chains_stages_with_afterok(tmp_path: Path) -> None:
    from conftest import make_docs, write_jsonl

    from ipt_hpc.pipeline import submit

    n = 4
    ref = reference(tmp_path, n)
    run = tmp_path / "run"
    inp = write_jsonl(run / "in.jsonl", make_docs(120, seed=3, max_words=40))
    steps, cfg = _pipeline_steps(run, n, [inp])
    result = submit(steps, cfg, run)
    assert [r["step"] for r in result] == ["shard", "upper"]
    assert result[1]["dependency"] == f"afterok:{result[0]['job_ids'][0]}"
    waiting = queue_states(result[1]["job_ids"])
    assert waiting and all(s == "PENDING" for s in waiting.values())  # held until the shard stage is done
    deadline = time.time() + 300
    while time.time() < deadline and not stage_status(run / "upper")["complete"]:
        time.sleep(1)
    assert (run / "raw" / "manifest.json").exists()
    assert outputs(run, n) == ref


def test_pipeline_failed_upstream_cancels_dependents(tmp_path: Path) -> None:
    from ipt_hpc.pipeline import submit

    run = tmp_path / "run"
    run.mkdir()
    bad = run / "in.jsonl"
    bad.write_text('{"content": "fine"}\n{not json\n')
    steps, cfg = _pipeline_steps(run, 2, [bad])
    result = submit(steps, cfg, run)
    ids = result[0]["job_ids"] + result[1]["job_ids"]
    deadline = time.time() + 180
    while time.time() < deadline and queue_states(ids):
        time.sleep(1)
    assert not queue_states(ids), "dependents of a failed stage must not stay pending forever"
    st = stage_status(run / "upper")
    assert st["counts"]["done"] == 0 and st["counts"]["failed"] == 2
    assert not (run / "raw" / "manifest.json").exists()
