"""Failures stop where they start (local and debug executors): a failed shard stops the pipeline
with the root cause first, a stage refuses incomplete input, preflight refuses before anything
starts, and errors are one line each (grouped), with the traceback kept in a log file."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import run_cli, shard_corpus
from test_fanout import execution, make_raw, stage

from ipt_hpc.errors import IptError
from ipt_hpc.execution import StageState, TaskFailures, launch, shard_name
from ipt_hpc.execution.submit import IncompleteInput
from ipt_hpc.execution.tasks import group_failures
from ipt_hpc.preflight import PreflightFailed, stage_checker


def demo_sets(model: Path) -> list[str]:
    """The demo config with a tiny random synthesizer (short generations) and a short training."""
    sets = {
        "synth.model": model,
        "tokenize.tokenizer": model,
        "synth.max_new_tokens": 8,
        "synth.max_model_len": 512,
        "train.model.vocab_size": 512,
        "train.train_iters": 12,
        "train.save_interval": 6,
    }
    return ["--config", "configs/demo.yaml", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


# the tests of a failing synthesize step: without the decontaminate step, which would read the bad shard first
SYNTH_FIRST = ["--set", "decontaminate.enabled=false"]


def truncated_raw(run: Path, shard: int = 2) -> Path:
    """RUN/raw made by the real shard stage of the demo config, then one shard cut in half by hand."""
    proc = run_cli("shard", "--config", "configs/demo.yaml", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    path = run / "raw" / shard_name(shard, 4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_shard_stops_the_local_pipeline_with_the_root_cause_first(tmp_path: Path, tiny_synth: Path) -> None:
    run = tmp_path / "run"
    bad = truncated_raw(run)
    proc = run_cli("pipeline", "--run", str(run), *demo_sets(tiny_synth), *SYNTH_FIRST)
    assert proc.returncode == 2
    error = proc.stderr[proc.stderr.index("error: ") :]
    lines = error.splitlines()
    assert lines[0].startswith("error: pipeline stopped at step 2/10 (synthesize); later steps did not run (templify")
    assert lines[1] == "synthesize: 1 of 4 shards failed:"
    assert (
        lines[2] == f"  - shard-00002.jsonl.zst: {bad}: corrupt or truncated zstd data (truncated zstd frame at byte 0)"
    )
    assert lines[3].startswith(f"resume: python -m ipt_hpc.launch synthesize --run {run} --shards failed")
    assert "Traceback" not in proc.stderr
    assert not (run / "augmented").exists(), "no later stage may start"
    # the stage alone, on the same run: refused by the incomplete input, before any worker starts
    proc = run_cli("templify", "--run", str(run), *demo_sets(tiny_synth))
    assert proc.returncode == 2
    assert "templify: 1 input shard(s) in" in proc.stderr and "finish synthesize first" in proc.stderr
    assert f"shard-00002.jsonl.zst: input {run / 'synth' / 'shard-00002.jsonl.zst'} is not complete" in proc.stderr
    assert "(synthesize failed it: " in proc.stderr and "corrupt or truncated" in proc.stderr
    assert not list((run / "augmented").glob("shard-*")) and not (run / "augmented" / "_state" / "attempts").exists()
    # status: the root cause first, with the command that resumes
    proc = run_cli("status", "--run", str(run))
    assert proc.returncode == 0
    out = proc.stdout
    first = out.index("first failure: synthesize shard-00002.jsonl.zst")
    assert "corrupt or truncated" in out[first:] and "resume: python -m ipt_hpc.launch synthesize" in out[first:]


def test_a_hand_run_task_refuses_an_incomplete_input_shard(tmp_path: Path) -> None:
    """The same guard inside the task (hand-written sbatch arrays, or afterok bypassed)."""
    n = 3
    run = make_raw(tmp_path / "run", n)
    first = stage(run, n, fail_shards=[1])
    with pytest.raises(TaskFailures):
        launch(first, "all", execution(backend="debug"))
    second = stage(run, n)
    second = type(second)(**{**second.__dict__, "stage": "lower", "out_folder": "lower", "in_folder": "upper"})
    with pytest.raises(IncompleteInput, match=r"1 input shard\(s\).*\n  - shard-00001.jsonl.zst: input .*upper"):
        launch(second, "all", execution(backend="debug"))
    assert not (run / "lower" / "_state" / "attempts").exists()
    launch(second, "0,2", execution(backend="debug"))  # the complete shards may run on their own
    from ipt_hpc.execution.shards import ShardRunner

    with pytest.raises(IptError, match=r"lower refuses to start: input .*shard-00001.jsonl.zst is not complete"):
        ShardRunner(second)(1)
    failed = StageState(run / "lower").read("failed", shard_name(1, n))
    assert "upper failed it: " in failed["error"] and "deliberate failure of shard 1" in failed["error"]


def test_errors_are_one_line_each_and_grouped() -> None:
    failures = [
        (
            f"shard-0000{k}.jsonl.zst",
            f"no space left on device writing /r/raw/shard-0000{k}.jsonl.zst.partial (free 0.{k} MB)",
        )
        for k in (1, 2, 3)
    ] + [("shard-00004.jsonl.zst", "shard-00004.jsonl.zst: ValueError: bad")]
    groups = group_failures(failures)
    assert [len(labels) for labels, _ in groups] == [3, 1]
    text = str(TaskFailures("shard/write", failures, 5))
    assert text.splitlines() == [
        "shard/write: 4 of 5 shards failed:",
        "  - 3 shards (shard-00001.jsonl.zst, shard-00002.jsonl.zst, shard-00003.jsonl.zst): no space left on device"
        " writing /r/raw/shard-00001.jsonl.zst.partial (free 0.1 MB)",
        "  - shard-00004.jsonl.zst: ValueError: bad",
    ]


def test_an_unexpected_error_is_one_line_with_its_traceback_in_the_shard_log(tmp_path: Path) -> None:
    n = 2
    run = make_raw(tmp_path / "run", n)
    with pytest.raises(TaskFailures) as err:
        launch(stage(run, n, fail_shards=[0]), "all", execution(backend="local", workers=2))
    lines = str(err.value).splitlines()
    assert lines[1].startswith("  - shard-00000.jsonl.zst: RuntimeError: deliberate failure of shard 0 (traceback: ")
    log = Path(lines[1].split("(traceback: ")[1].rstrip(")"))
    assert log == run / "upper" / "_state" / "logs" / "shards" / "shard-00000.jsonl.zst.log"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in slow_upper" in text
    assert len(lines) == 3 and lines[2].startswith("resume: ")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_disk_full_during_shard_is_one_grouped_line_and_preflight_sees_it_first(tmp_path: Path) -> None:
    from conftest import make_docs, write_jsonl

    small = tmp_path / "small"
    if not _tmpfs(small, "256k"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", make_docs(1500, seed=5, min_words=200, max_words=400))
        args = ["--input", str(inp), "--text-field", "content", "--num-shards", "3", "--out", str(small / "raw")]
        proc = run_cli("shard", *args, "--workers", "3")
        assert proc.returncode == 2
        assert "error: shard: preflight found 1 problem(s); nothing was submitted" in proc.stderr
        assert f"--out={small / 'raw'}: the shards need(s) about" in proc.stderr and " MB free" in proc.stderr
        assert not (small / "raw").exists()
        proc = run_cli("shard", *args, "--workers", "3", "--skip-preflight")
        assert proc.returncode == 2
        error = proc.stderr[proc.stderr.index("error: ") :].splitlines()
        assert error[0] == "error: shard: 3 of 3 shards failed:"
        assert error[1].startswith(
            f"  - 3 shards (shard-00000.jsonl.zst, shard-00001.jsonl.zst, shard-00002.jsonl.zst): no space left on"
            f" device writing {small / 'raw'}/shard-0000"
        )
        assert re.search(r"\.jsonl\.zst\.partial \(free 0\.\d MB\)", error[1]), error[1]
        assert error[2] == "resume: rerun the same command (done shards are kept)"
        assert len(error) == 3 and "Traceback" not in proc.stderr
        assert not list((small / "raw").glob("shard-*.jsonl.zst")), "no complete-looking shard"
        assert not (small / "raw" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_preflight_refuses_a_missing_model_and_a_slurm_request_that_cannot_fit(tmp_path: Path) -> None:
    run = make_raw(tmp_path / "run", 2)
    proc = run_cli("synthesize", "--run", str(run), "--model", str(tmp_path / "nope"), "--executor", "slurm",
                   "--partition", "no-such-partition", "--set", "execution.slurm.gpus_per_node=1")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "error: synthesize: preflight found 2 problem(s); nothing was submitted (--skip-preflight" \
        " submits anyway):"  # fmt: skip
    assert lines[1] == f"  - synth.model={tmp_path / 'nope'}: does not exist; give an existing model folder or a hub" \
        " name (org/name)"  # fmt: skip
    if "sinfo" in lines[2] or "not found" in lines[2]:
        assert lines[2].startswith("  - execution.backend=slurm: sbatch") or "sinfo" in lines[2]
    else:
        assert lines[2].startswith("  - execution.slurm.partition=no-such-partition: no partition 'no-such-partition'")
    assert not (run / "synth").exists()
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{not json")
    proc = run_cli("tokenize", "--run", str(run), "--input-stage", "raw", "--tokenizer", str(empty))
    assert proc.returncode == 2
    assert f"tokenize.tokenizer={empty}: has no tokenizer_config.json or tokenizer.json" in proc.stderr


def test_preflight_estimates_room_from_the_stage_ratio(tmp_path: Path) -> None:
    n = 2
    run = make_raw(tmp_path / "run", n)
    from ipt_hpc import preflight

    st = stage(run, n)
    size = sum((run / "raw" / shard_name(k, n)).stat().st_size for k in range(n))
    assert preflight.stage_estimate(st, [0, 1]) == int(size * preflight.RATIOS.get("upper", 2.0) * preflight.MARGIN)
    launch(st, "0", execution(backend="debug"))  # one shard done: its own ratio replaces the default
    out0 = (run / "upper" / shard_name(0, n)).stat().st_size
    in0 = (run / "raw" / shard_name(0, n)).stat().st_size
    in1 = (run / "raw" / shard_name(1, n)).stat().st_size
    assert preflight.stage_estimate(st, [1]) == int(in1 * out0 / in0 * preflight.MARGIN)
    check = stage_checker(None)
    check(st, [1])  # this disk has room
    huge = type(st)(**{**st.__dict__, "stage": "tokenize"})
    (run / "upper" / "_state" / "done" / f"{shard_name(0, n)}.json").unlink()
    preflight.RATIOS["tokenize"], saved = 1e12, preflight.RATIOS["tokenize"]
    try:
        with pytest.raises(PreflightFailed, match=r"run=.*upper: tokenize of 1 shard\(s\) need\(s\) about .* free"):
            check(huge, [1])
    finally:
        preflight.RATIOS["tokenize"] = saved


def test_a_rerun_shard_coordinator_leaves_shards_held_by_a_live_job_to_it(tmp_path: Path) -> None:
    """A coordinator requeued while its earlier arrays still run must not start a second writer of their
    shards: it writes the others, waits for the held ones, and says so if their job ends without them."""
    from conftest import make_docs, write_jsonl
    from test_shard import cfg_for

    from ipt_hpc.atomic import read_json, write_json_atomic
    from ipt_hpc.execution import build
    from ipt_hpc.execution.submit import record_submission
    from ipt_hpc.stages import shard

    inp = write_jsonl(tmp_path / "in.jsonl", make_docs(60, seed=2, max_words=30))
    cfg = cfg_for([inp], **{"shard.num_shards": 3})
    out = tmp_path / "raw"
    holder = subprocess.Popen(["sleep", "4"])  # the live 'earlier job' that holds shard 1
    threading.Thread(target=holder.wait, daemon=True).start()  # reaped when it ends (a zombie looks alive)
    try:
        this_config = build(shard.STAGE, cfg, tmp_path).config_hash()  # the folder is this config's
        StageState(out).write_stage({"stage": "shard", "num_shards": 3, "config_hash": this_config})
        record_submission(StageState(out), [1], backend="local")  # this process's pid ...
        sub = sorted((out / "_state" / "submissions").glob("*.json"))[0]
        write_json_atomic(sub, {**read_json(sub), "pid": holder.pid})  # ... becomes the holder's
        with pytest.raises(IptError, match=r"shard-00001.jsonl.zst: an earlier job held them and ended without"):
            shard_corpus(cfg, out)
        assert holder.poll() is not None, "the coordinator waited for the holder to end"
    finally:
        holder.kill()
    assert [p.name for p in sorted(out.glob("shard-*.jsonl.zst"))] == ["shard-00000.jsonl.zst", "shard-00002.jsonl.zst"]
    manifest = shard_corpus(cfg, out)  # the rerun writes the shard the dead job left
    assert manifest["totals"]["docs"] == 60 and (out / "shard-00001.jsonl.zst").exists()
