"""The execution layer on the local and debug backends: selection, packing, idempotence,
failures, preemption (USR2 -> checkpoint -> requeue) and SIGKILL, each resuming to identical bytes."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import make_docs, shard_corpus, write_jsonl
from fanout_stage import slow_upper

from ipt_hpc.config import load_config
from ipt_hpc.errors import IptError
from ipt_hpc.execution import StageRun, StageState, TaskFailures, launch, parse_shards, shard_name
from ipt_hpc.execution.backends import pack, split
from ipt_hpc.execution.monitor import stage_status
from ipt_hpc.execution.selection import compress_ids
from ipt_hpc.records import read_records
from ipt_hpc.status import run_status


def make_raw(run: Path, num_shards: int, docs: int = 120, seed: int = 3) -> Path:
    """RUN/raw with ``num_shards`` shards made by the real shard stage."""
    inp = write_jsonl(run / "in.jsonl", make_docs(docs, seed=seed, max_words=40))
    cfg = load_config(
        None,
        None,
        {
            "shard.inputs": [str(inp)],
            "shard.text_field": "content",
            "shard.num_shards": num_shards,
            "execution.backend": "debug",
        },
    )
    shard_corpus(cfg, run / "raw")
    return run


def stage(run: Path, n: int, **cfg) -> StageRun:
    return StageRun("upper", str(run), "upper", "raw", n, slow_upper, dict(cfg))


def execution(**sets):
    return load_config(None, None, {f"execution.{k}": v for k, v in sets.items()}).execution


def outputs(run: Path, n: int) -> dict[str, bytes]:
    return {shard_name(k, n): (run / "upper" / shard_name(k, n)).read_bytes() for k in range(n)}


def reference(tmp_path: Path, n: int, docs: int = 120) -> dict[str, bytes]:
    ref = make_raw(tmp_path / "ref", n, docs)
    launch(stage(ref, n), "all", execution(backend="debug"))
    return outputs(ref, n)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- selection and packing ------------------------------------------------------------------
def test_parse_shards() -> None:
    assert parse_shards("0-4", 10) == [0, 1, 2, 3, 4]
    assert parse_shards("3,17,40-42", 50) == [3, 17, 40, 41, 42]
    assert parse_shards(" 5 , 1-2 ,2", 10) == [1, 2, 5]
    assert parse_shards("all", 3) == [0, 1, 2]
    assert parse_shards("missing", 5, done={1, 3}) == [0, 2, 4]
    assert parse_shards("failed", 5, done={1}, failed={1, 4}) == [4]
    assert compress_ids([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad, msg in [
        ("1-x", "cannot read '1-x'"),
        ("5-2", "runs backwards"),
        ("0-10", "shard 10 is out of range"),
        ("", "cannot read"),
        ("-3", "cannot read"),
    ]:
        with pytest.raises(IptError, match=msg):
            parse_shards(bad, 10)


def test_packing_and_array_split() -> None:
    assert pack(5, 2) == [[0, 1], [2, 3], [4]]
    packs = pack(10_000, 1)
    arrays = split(packs, 1001)
    assert len(arrays) == 10 and all(len(a) <= 1001 for a in arrays)
    assert sum(len(a) for a in arrays) == 10_000
    assert len(split(pack(10_000, 4), 1001)) == 3


# -- runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["debug", "local"])
def test_every_shard_done_exactly_once(tmp_path: Path, backend: str) -> None:
    ref = reference(tmp_path, 6)
    run = make_raw(tmp_path / "run", 6)
    result = launch(stage(run, 6), "all", execution(backend=backend, workers=2))
    assert result["submitted"] == 6
    assert outputs(run, 6) == ref
    state = StageState(run / "upper")
    for k in range(6):
        events = [e["event"] for e in state.events(shard_name(k, 6))]
        assert events == ["start", "done"]
    st = stage_status(run / "upper")
    assert st["counts"]["done"] == 6 and st["complete"]
    assert st["records"] == 120
    # idempotent: nothing left to do
    assert launch(stage(run, 6), "all", execution(backend=backend))["submitted"] == 0


@pytest.mark.parametrize("backend", ["debug", "local"])
def test_a_shard_learns_which_inputs_its_task_runs_next(tmp_path: Path, backend: str) -> None:
    """``ShardContext.next_inputs``: the next (at most two) shards of the same pack not done yet."""
    run = make_raw(tmp_path / "run", 6)
    launch(stage(run, 6), "3", execution(backend="debug"))  # done before: never announced as next
    launch(stage(run, 6), "all", execution(backend=backend, workers=2))
    state = StageState(run / "upper")
    seen = {k: state.read("done", shard_name(k, 6))["next_inputs"] for k in range(6)}
    todo = [0, 1, 2, 4, 5]
    packs = [todo] if backend == "debug" else [todo[0::2], todo[1::2]]  # local: 2 strided packs
    for items in packs:
        for i, k in enumerate(items):
            assert seen[k] == [shard_name(j, 6) for j in items[i + 1 : i + 3]], (k, seen)
    assert seen[3] == []  # it ran alone


def test_selection_runs_only_chosen_shards(tmp_path: Path) -> None:
    run = make_raw(tmp_path / "run", 8)
    launch(stage(run, 8), "1,5-6", execution(backend="debug"))
    st = stage_status(run / "upper")
    assert {k for k, v in st["shards"].items() if v == "done"} == {shard_name(k, 8) for k in (1, 5, 6)}
    assert st["counts"]["never_submitted"] == 5
    launch(stage(run, 8), "missing", execution(backend="debug"))
    assert stage_status(run / "upper")["complete"]


def test_other_config_is_refused_and_force_redoes(tmp_path: Path) -> None:
    run = make_raw(tmp_path / "run", 3)
    launch(stage(run, 3), "all", execution(backend="debug"))
    with pytest.raises(IptError, match="another config"):
        launch(stage(run, 3, flush_every=7), "all", execution(backend="debug"))
    launch(stage(run, 3, flush_every=7), "all", execution(backend="debug"), force=True)
    assert stage_status(run / "upper")["complete"]


def test_failed_shard_is_found_and_redone(tmp_path: Path) -> None:
    ref = reference(tmp_path, 5)
    run = make_raw(tmp_path / "run", 5)
    with pytest.raises(TaskFailures, match="deliberate failure of shard 3"):
        launch(stage(run, 5, fail_shards=[3]), "all", execution(backend="local", workers=2))
    st = stage_status(run / "upper")
    assert st["counts"]["failed"] == 1 and st["counts"]["done"] == 4
    assert "deliberate failure" in st["failures"][shard_name(3, 5)]
    assert parse_shards("failed", 5, failed={3}) == [3]
    result = launch(stage(run, 5, fail_shards=[3]), "failed", execution(backend="local"))
    assert result["submitted"] == 1
    assert outputs(run, 5) == ref
    events = [e["event"] for e in StageState(run / "upper").events(shard_name(3, 5))]
    assert events == ["start", "failed", "start", "resumed", "done"]


def test_max_attempts_per_submission(tmp_path: Path) -> None:
    from ipt_hpc.execution.shards import ShardRunner

    run = make_raw(tmp_path / "run", 2)
    launch(stage(run, 2), "0", execution(backend="debug"))  # writes stage.json
    st = StageState(run / "upper")
    name = shard_name(1, 2)
    for attempt in (1, 2):  # as if requeued twice after preemptions
        st.log_event(name, "start", attempt=attempt)
    limited = dataclasses.replace(stage(run, 2), max_attempts=2, submitted_at=0.0)
    with pytest.raises(IptError, match="gave up after 2 attempts"):
        ShardRunner(limited)(1)
    assert "gave up" in st.read("failed", name)["error"]
    # a new submission (later submitted_at) gets a fresh budget
    ShardRunner(dataclasses.replace(limited, submitted_at=time.time()))(1)
    assert st.is_done(name)


def _running_marker(run: Path, name: str, min_records: int) -> dict | None:
    m = StageState(run / "upper").read("running", name)
    return m if m and m.get("records", 0) >= min_records else None


def launch_in_background(*args, **kwargs) -> tuple[threading.Thread, list[BaseException]]:
    """Run a blocking ``launch`` in a thread; errors land in the returned list."""
    errors: list[BaseException] = []

    def go() -> None:
        try:
            launch(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, errors


def test_local_preemption_signal_checkpoints_requeues_and_resumes(tmp_path: Path) -> None:
    ref = reference(tmp_path, 1, docs=100)
    run = make_raw(tmp_path / "run", 1, docs=100)
    name = shard_name(0, 1)
    t, errors = launch_in_background(stage(run, 1, delay_s=0.05), "all", execution(backend="local", workers=1))
    wait_until(lambda: _running_marker(run, name, 5), 60, "the task to make progress")
    os.kill(_running_marker(run, name, 5)["pid"], signal.SIGUSR2)  # submitit's preemption signal
    t.join(120)
    assert not t.is_alive() and not errors, errors
    assert outputs(run, 1) == ref
    events = StageState(run / "upper").events(name)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["start", "preempted"] and kinds[-1] == "done" and kinds.count("start") == 2
    resumed = next(e for e in events if e["event"] == "resumed")
    assert 5 <= resumed["records"] < 100
    assert len(list(read_records(run / "upper" / name))) == 100


def test_local_sigkill_then_failed_rerun_resumes_from_last_durable_record(tmp_path: Path) -> None:
    ref = reference(tmp_path, 2, docs=200)
    run = make_raw(tmp_path / "run", 2, docs=200)
    name = shard_name(1, 2)
    t, errors = launch_in_background(stage(run, 2, delay_s=0.05), "all", execution(backend="local", workers=2))
    wait_until(lambda: _running_marker(run, name, 5), 60, "the task to make progress")
    os.kill(_running_marker(run, name, 5)["pid"], signal.SIGKILL)
    t.join(120)
    assert errors and "died" in str(errors[0])
    st = run_status(run)["stages"][-1]
    assert st["shards"][name] == "failed"
    launch(stage(run, 2, delay_s=0.05), "failed", execution(backend="local"))
    assert outputs(run, 2) == ref
    events = StageState(run / "upper").events(name)
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["records"] >= 5


def test_a_shard_is_never_written_by_two_tasks(tmp_path: Path) -> None:
    import fcntl

    from ipt_hpc.execution.shards import ShardRunner

    run = make_raw(tmp_path / "run", 2)
    launch(stage(run, 2), "0", execution(backend="debug"))
    lock = run / "upper" / "_state" / "locks" / f"{shard_name(1, 2)}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another task holds shard 1
    try:
        with pytest.raises(IptError, match="being processed by another task"):
            ShardRunner(dataclasses.replace(stage(run, 2), submitted_at=time.time()))(1)
    finally:
        os.close(fd)
    assert not (run / "upper" / shard_name(1, 2)).exists()


def test_local_workers_share_the_cpus_out_as_openmp_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the local executor's worker processes gets its share of the CPUs as OMP_NUM_THREADS (torch would
    start a thread per core in each); a value the user set is kept."""
    cpus = len(os.sched_getaffinity(0))
    for workers, env, want in ((2, None, max(1, cpus // 2)), (1, None, cpus), (2, "3", 3)):
        if env is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", env)
        run = make_raw(tmp_path / f"run-{workers}-{env}", 2)
        launch(stage(run, 2), "all", execution(backend="local", workers=workers))
        state = StageState(run / "upper")
        got = [state.read("done", shard_name(k, 2))["omp_num_threads"] for k in range(2)]
        assert got == [str(want), str(want)], (workers, env, got)


def test_in_flight_shards_are_not_submitted_twice(tmp_path: Path) -> None:
    run = make_raw(tmp_path / "run", 2, docs=200)
    name = shard_name(1, 2)
    t, errors = launch_in_background(stage(run, 2, delay_s=0.05), "1", execution(backend="local", workers=1))
    wait_until(lambda: _running_marker(run, name, 5), 60, "the task to make progress")
    again = launch(stage(run, 2, delay_s=0.05), "all", execution(backend="debug"))
    assert again["submitted"] == 1 and again["in_flight"] == 1  # only shard 0 ran here
    t.join(120)
    assert not errors
    assert stage_status(run / "upper")["complete"]


NASTY = "we ird'dir;$(touch PWNED)\"`x`"


def test_rendered_sbatch_quotes_every_value(tmp_path: Path) -> None:
    import subprocess

    from ipt_hpc.execution.sbatch import render

    run = make_raw(tmp_path / NASTY, 2)
    launch(stage(run, 2), "0", execution(backend="debug"))  # prepares the stage folder
    cfg = execution(**{"slurm.partition": "de bug;ls", "slurm.setup": ["export FOO=1"], "shards_per_task": 2})
    script = render(run / "upper", cfg, array="0-0%1", python="/opt/my python/bin/python")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert '#SBATCH --partition="de bug;ls"' in script
    assert "exec '/opt/my python/bin/python' -m ipt_hpc.launch run-shard" in script
    # the stage folder survives the shell unchanged: run the exec line's words through bash
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    words = subprocess.run(
        ["bash", "-c", 'printf "%s\\n" ' + exec_line[len("exec ") :]],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_ARRAY_TASK_ID": "7"},
        cwd=tmp_path,
    ).stdout.splitlines()
    assert words[words.index("--stage-dir") + 1] == str((run / "upper").resolve())
    assert words[words.index("--task-index") + 1] == "7"
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(IptError, match="may not contain a newline"):
        render(run / "upper", execution(**{"slurm.partition": "a\nb"}), array="0-1")
    # by default, every task of the stage: 2 shards at 2 per task is 1 task; parallelism throttles it
    assert "#SBATCH --array=0-0\n" in render(run / "upper", cfg)
    assert "#SBATCH --array=0-1%1\n" in render(run / "upper", execution(shards_per_task=1, parallelism=1))


def test_run_shard_entry_point_runs_its_pack(tmp_path: Path) -> None:
    from conftest import run_cli

    ref = reference(tmp_path, 5)
    run = make_raw(tmp_path / "run", 5)
    launch(stage(run, 5), "0", execution(backend="debug"))
    proc = run_cli("run-shard", "--stage-dir", str(run / "upper"), "--task-index", "1", "--shards-per-task", "2")
    assert proc.returncode == 0, proc.stderr
    assert {k for k, v in stage_status(run / "upper")["shards"].items() if v == "done"} == {
        shard_name(k, 5) for k in (0, 2, 3)
    }
    proc = run_cli(
        "run-shard", "--stage-dir", str(run / "upper"), "--task-index", "0", "--offset", "1", "--shards-per-task", "4"
    )
    assert proc.returncode == 0, proc.stderr
    assert outputs(run, 5) == ref


def test_status_cli_table_and_json_without_slurm(tmp_path: Path) -> None:
    import json

    from conftest import run_cli

    run = make_raw(tmp_path / "run", 4)
    with pytest.raises(TaskFailures):
        launch(stage(run, 4, fail_shards=[1]), "0-2", execution(backend="debug"))
    proc = run_cli("status", "--run", str(run), "--no-queue")
    assert proc.returncode == 0, proc.stderr
    assert "shard" in proc.stdout and "upper" in proc.stdout
    assert "deliberate failure of shard 1" in proc.stdout
    proc = run_cli("status", "--run", str(run), "--json", "--shards")
    report = json.loads(proc.stdout)
    raw, upper = report["stages"]
    assert raw["stage"] == "shard" and raw["complete"]
    assert upper["counts"] == {"done": 2, "running": 0, "pending": 0, "failed": 1, "never_submitted": 1}
    assert upper["shards"][shard_name(3, 4)] == "never_submitted"
    assert run_cli("status", "--run", str(tmp_path / "nothing")).returncode == 2


def test_status_names_each_tokenize_group(tmp_path: Path) -> None:
    from ipt_hpc.execution import StageState

    run = tmp_path / "run"
    for group in ("augmented", "raw"):
        StageState(run / "tokens" / group).write_stage({"stage": "tokenize", "num_shards": 1})
    names = [st["name"] for st in run_status(run, use_queue=False)["stages"]]
    assert names == ["tokenize augmented", "tokenize raw"]


def test_advisory_state_survives_what_a_crash_leaves_of_it(tmp_path: Path) -> None:
    """Events and submission records are not fsynced (advisory): a torn event line or an emptied submission
    record, what a node crash may leave, is skipped; the done marker, which decides, stays durable."""
    state = StageState(tmp_path / "stage")
    name = shard_name(0, 1)
    state.log_event(name, "start", attempt=1)
    with open(state.attempts_path(name), "ab") as fh:
        fh.write(b'{"event": "do\x00\x00\x00\n\x00\x00\n')  # a torn append and zeroed blocks
    state.log_event(name, "done", attempt=1)
    assert [e["event"] for e in state.events(name)] == ["start", "done"]
    first = state.record_submission({"backend": "debug"})
    second = state.record_submission({"backend": "local"})
    first.write_bytes(b"")  # renamed into place, its data lost with the node
    assert [s["backend"] for s in state.submissions()] == ["local"]
    state.end_submission(second)
    assert "ended" in state.submissions()[0]
