"""tokenize: Megatron indexed datasets read back by megatron-core itself, merge, policies, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_docs
from test_fanout import make_raw
from tokenizer_fixture import train_tokenizer

from ipt_hpc.config import load_config
from ipt_hpc.errors import IptError
from ipt_hpc.execution import StageState, TaskFailures, build, run_stage, shard_name
from ipt_hpc.indexed import merge, paths
from ipt_hpc.records import RecordWriter, read_records
from ipt_hpc.stages import tokenize

pytest.importorskip("megatron.core")
from megatron.core.datasets.indexed_dataset import IndexedDataset


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def cfg_for(tok: Path, **sets):
    base = {
        "tokenize.tokenizer": str(tok),
        "tokenize.input_stage": "raw",
        "tokenize.workers": 2,
        "execution.backend": "debug",
    }
    return load_config(None, None, {**base, **{f"tokenize.{k}" if "." not in k else k: v for k, v in sets.items()}})


def expected_ids(tok_dir: Path, text: str, bos: bool = True, eod: bool = True) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if bos else []) + ids + ([tok.eos_token_id] if eod else [])


def docs_of(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))  # megatron-core's own reader
    return [ds[i].tolist() for i in range(len(ds))]


def fake_stage(run: Path, folder: str, shards: list[list[dict]], frame_bytes: int = 1 << 20) -> None:
    """A finished stage folder holding the given records (for inputs the shard stage would reject)."""
    state = StageState(run / folder)
    state.write_stage({"stage": folder, "num_shards": len(shards), "config_hash": "test"})
    for k, recs in enumerate(shards):
        name = shard_name(k, len(shards))
        with RecordWriter(run / folder / name, frame_bytes=frame_bytes) as w:
            w.write_many(recs)
        state.mark_done(name, {"records": len(recs)})


@pytest.mark.parametrize("dtype", ["auto", "int32"])
def test_megatron_reads_exactly_the_tokenizer_output(tmp_path: Path, tok_dir: Path, dtype: str) -> None:
    run = make_raw(tmp_path / "run", 3, docs=60)
    result = run_stage(tokenize.STAGE, cfg_for(tok_dir, dtype=dtype), run)
    assert result["submitted"] == 3
    group = run / "tokens" / "raw"
    for k in range(3):
        name = shard_name(k, 3)
        texts = [r["text"] for r in read_records(run / "raw" / name)]
        got = docs_of(group / name.removesuffix(".jsonl.zst"))
        assert got == [expected_ids(tok_dir, t) for t in texts]
    ds = IndexedDataset(str(run / "tokens" / "raw"))
    assert ds.index.dtype == (np.uint16 if dtype == "auto" else np.int32)
    manifest = result["manifest"]
    assert manifest["documents"] == 60 == len(ds)
    assert manifest["tokens"] == int(ds.sequence_lengths.sum())


def test_merge_equals_tokenizing_the_concatenation(tmp_path: Path, tok_dir: Path) -> None:
    many = make_raw(tmp_path / "many", 4, docs=80)
    one = make_raw(tmp_path / "one", 1, docs=80)
    run_stage(tokenize.STAGE, cfg_for(tok_dir), many)
    run_stage(tokenize.STAGE, cfg_for(tok_dir), one)
    for ext in (0, 1):
        a = paths(many / "tokens" / "raw")[ext].read_bytes()
        b = paths(one / "tokens" / "raw" / "shard-00000")[ext].read_bytes()
        assert a == b
    # merging by hand in another order gives that order
    parts = [many / "tokens" / "raw" / f"shard-0000{k}" for k in (2, 0)]
    merge(parts, tmp_path / "custom")
    assert docs_of(tmp_path / "custom") == docs_of(parts[0]) + docs_of(parts[1])
    # where the kernel copy stops part way (unsupported file system), the rest is copied by reading
    real_copy, calls = os.copy_file_range, []

    def flaky_copy(src: int, dst: int, count: int) -> int:
        calls.append(count)
        if len(calls) > 1:
            raise OSError(18, "Invalid cross-device link")
        return real_copy(src, dst, min(count, 7))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "copy_file_range", flaky_copy)
        merge(parts, tmp_path / "copied")
    assert len(calls) == 3  # first shard: 7 bytes, then refused; second shard: refused at once
    for ext in (0, 1):
        assert paths(tmp_path / "copied")[ext].read_bytes() == paths(tmp_path / "custom")[ext].read_bytes()


def test_unicode_and_policies(tmp_path: Path, tok_dir: Path) -> None:
    texts = ["naïve café", "東京タワー 🚀", "e\u0301 combining", "tab\tand\nnewline", "", "plain"]
    run = tmp_path / "run"
    fake_stage(run, "aug", [[{"id": str(i), "text": t} for i, t in enumerate(texts)]])
    with pytest.raises(TaskFailures, match=r"shard-00000\.jsonl\.zst:5: empty text"):
        run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug"), run)
    assert not paths(run / "tokens" / "aug" / "shard-00000")[1].exists()
    res = run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug", empty_text="skip"), run, force=True)
    got = docs_of(run / "tokens" / "aug" / "shard-00000")
    assert got == [expected_ids(tok_dir, t) for t in texts if t]
    assert res["manifest"]["skipped_empty"] == 1
    run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug", empty_text="keep", group="kept"), run)
    got = docs_of(run / "tokens" / "kept" / "shard-00000")
    assert got[4] == expected_ids(tok_dir, "") and len(got) == len(texts)


def test_bos_and_eod_options(tmp_path: Path, tok_dir: Path) -> None:
    run = make_raw(tmp_path / "run", 1, docs=5)
    text = next(read_records(run / "raw" / shard_name(0, 1)))["text"]
    run_stage(tokenize.STAGE, cfg_for(tok_dir, prepend_bos="never", append_eod=False, group="bare"), run)
    assert docs_of(run / "tokens" / "bare" / "shard-00000")[0] == expected_ids(tok_dir, text, bos=False, eod=False)
    plain = train_tokenizer(tmp_path / "nobos", add_bos=False)  # a GPT-2 style tokenizer adds no BOS itself
    run_stage(tokenize.STAGE, cfg_for(plain, group="gpt2style"), run)
    assert docs_of(run / "tokens" / "gpt2style" / "shard-00000")[0] == expected_ids(plain, text, bos=False)


def test_bad_records_follow_the_policy(tmp_path: Path, tok_dir: Path) -> None:
    run = tmp_path / "run"
    fake_stage(run, "aug", [[{"text": "good"}, {"body": "no text"}, {"text": 5}, {"text": "also good"}]])
    with pytest.raises(TaskFailures, match=r":2: text field 'text' is missing or not a string"):
        run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug"), run)
    cfg = cfg_for(tok_dir, input_stage="aug", **{"records.on_bad_record": "quarantine"})
    res = run_stage(tokenize.STAGE, cfg, run, force=True)
    assert res["manifest"]["bad"] == 2 and res["manifest"]["documents"] == 2
    q = list(read_records(run / "tokens" / "aug" / "quarantine" / "shard-00000.jsonl.zst"))
    assert [r["line"] for r in q] == [2, 3]


def _mixed_records(n: int) -> list[dict]:
    recs: list[dict] = []
    for i in range(n):
        if i % 37 == 5:
            recs.append({"body": "no text"})
        elif i % 41 == 7:
            recs.append({"text": ""})
        else:
            recs.append({"text": f"record {i} " + "word " * (i % 13), "group": "b" if i % 5 == 0 else "a"})
    return recs


@pytest.mark.parametrize("sets", [{}, {"record_group": "a", "empty_text": "keep", "group": "aug"}])
def test_workers_reading_frames_equal_reading_here(tmp_path: Path, tok_dir: Path, monkeypatch, sets) -> None:
    """Many small frames (workers read frame ranges, tail ranges cut into parts) give the same dataset,
    counts and quarantine lines as the main process reading the shard; errors name the same line."""
    run = tmp_path / "run"
    fake_stage(run, "aug", [_mixed_records(700), _mixed_records(90)], frame_bytes=300)
    cfg = cfg_for(tok_dir, input_stage="aug", **{"empty_text": "skip", "records.on_bad_record": "quarantine", **sets})

    def not_here(*args):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(tokenize, "_tokenize_read_here", not_here)
    monkeypatch.setattr(tokenize, "TASK_BYTES", 2000)  # several ranges of a few frames each
    fast = run_stage(tokenize.STAGE, cfg, run)["manifest"]
    monkeypatch.undo()
    outputs = [paths(run / "tokens" / "aug")[e].read_bytes() for e in (0, 1)]
    quarantined = list(read_records(run / "tokens" / "aug" / "quarantine" / "shard-00000.jsonl.zst"))
    monkeypatch.setattr(tokenize, "MAX_TASK_BYTES", 0)  # every frame too large: the general path
    here = run_stage(tokenize.STAGE, cfg, run, force=True)["manifest"]
    assert [paths(run / "tokens" / "aug")[e].read_bytes() for e in (0, 1)] == outputs
    assert list(read_records(run / "tokens" / "aug" / "quarantine" / "shard-00000.jsonl.zst")) == quarantined
    assert [r["line"] for r in quarantined] == [i + 1 for i in range(700) if i % 37 == 5]
    for key in ("documents", "tokens", "bad", "skipped_empty", "other_group"):
        assert fast[key] == here[key], key
    monkeypatch.undo()
    with pytest.raises(TaskFailures, match=r"shard-00000\.jsonl\.zst:6: text field"):
        run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug", empty_text="skip"), run, force=True)
    with pytest.raises(TaskFailures, match=r"shard-00000\.jsonl\.zst:8: empty text"):
        run_stage(
            tokenize.STAGE,
            cfg_for(tok_dir, input_stage="aug", **{"records.on_bad_record": "quarantine"}),
            run,
            force=True,
        )


def test_next_shard_starts_early_and_gives_the_same_bytes(tmp_path: Path, tok_dir: Path, monkeypatch) -> None:
    """The workers start the task's next shard while this one finishes: the same bytes as one shard per
    call; a bad record in a shard started early fails that shard only, with its own file and line; a
    next shard whose file changed meanwhile is read again."""
    shards = [[{"text": f"shard {k} doc {i} " + "word " * (i % 11)} for i in range(150 + 40 * k)] for k in range(4)]
    shards[2][50] = {"text": ""}
    for name in ("run", "ref"):
        fake_stage(tmp_path / name, "aug", shards, frame_bytes=300)
    monkeypatch.setattr(tokenize, "TASK_BYTES", 2000)
    taken: list[tuple[str, bool]] = []
    real_take = tokenize._take_ahead

    def spy(job, path, pool):
        feed = real_take(job, path, pool)
        taken.append((path.name, feed is not None))
        return feed

    monkeypatch.setattr(tokenize, "_take_ahead", spy)
    cfg = cfg_for(tok_dir, input_stage="aug")
    with pytest.raises(TaskFailures, match=r"shard-00002\.jsonl\.zst:51: empty text") as failed:
        run_stage(tokenize.STAGE, cfg, tmp_path / "run")
    assert "shard-00001" not in str(failed.value) and "shard-00003" not in str(failed.value)
    # shard 3 may or may not have been started early: that depends on when shard 2's error came back
    assert taken[:3] == [(shard_name(k, 4), k > 0) for k in range(3)] and taken[3][0] == shard_name(3, 4)
    taken.clear()
    for k in (0, 1, 3):  # one shard per call: nothing runs next, nothing is started early
        run_stage(tokenize.STAGE, cfg, tmp_path / "ref", str(k))
    assert taken == [(shard_name(k, 4), False) for k in (0, 1, 3)]
    for k in (0, 1, 3):
        for ext in (".bin", ".idx"):
            name = f"shard-{k:05d}{ext}"
            assert (tmp_path / "run/tokens/aug" / name).read_bytes() == (
                tmp_path / "ref/tokens/aug" / name
            ).read_bytes()
    assert not (tmp_path / "run/tokens/aug/shard-00002.idx").exists()

    job = build(tokenize.STAGE, cfg, tmp_path / "ref").stage_config
    path = tmp_path / "ref" / "aug" / shard_name(2, 4)
    pool = tokenize._pool(job.workers)
    tokenize._AHEAD[str(path)] = feed = tokenize._Feed(job, path, tokenize._range_tasks(job, path, True), pool)
    assert feed.send()
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert real_take(job, path, pool) is None and not tokenize._AHEAD


def test_worker_takes_a_preloaded_tokenizer_only_if_it_is_the_jobs(tmp_path: Path, tok_dir: Path, monkeypatch) -> None:
    """Workers load the source tokenizer while the job is prepared; a job whose file differs loads its own."""
    import hashlib
    import json

    from ipt_hpc.stages import tokenize_worker as tw

    monkeypatch.setattr(tw, "_WORKER", {})
    for var in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS"):  # _init_worker sets them; restored after
        monkeypatch.setenv(var, os.environ.get(var, ""))
    src = tok_dir / "tokenizer.json"
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(json.loads(src.read_text()), indent=1))  # same tokenizer, other bytes

    def spec(path: Path) -> tuple:
        return (str(path), hashlib.sha256(path.read_bytes()).hexdigest(), None, None, "uint16")

    tw._init_worker(str(src))
    preloaded = tw._WORKER["preloaded"][1]
    assert tw._setup(spec(src))["tok"] is preloaded
    tw._init_worker(str(src))
    second = tw._WORKER["preloaded"][1]
    mine = tw._setup(spec(other))["tok"]
    assert mine is not second and "preloaded" not in tw._WORKER
    assert mine.encode("same ids").ids == preloaded.encode("same ids").ids
    tw._init_worker(str(tmp_path / "missing.json"))  # only a hint: no error, nothing preloaded
    assert "preloaded" not in tw._WORKER


def test_frames_cut_inside_a_record_are_read_here(tmp_path: Path, tok_dir: Path) -> None:
    """zstd frames that do not end at record boundaries (another writer's file) still tokenize exactly."""
    import zstandard

    texts = [f"document number {i} " * (1 + i % 7) for i in range(50)]
    data = b"".join(b'{"text": "%s"}\n' % t.encode() for t in texts)
    run = tmp_path / "run"
    fake_stage(run, "aug", [[]])
    c = zstandard.ZstdCompressor(write_content_size=True)
    (run / "aug" / shard_name(0, 1)).write_bytes(
        b"".join(c.compress(data[k : k + 333]) for k in range(0, len(data), 333))
    )
    run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug"), run)
    assert docs_of(run / "tokens" / "aug" / "shard-00000") == [expected_ids(tok_dir, t) for t in texts]


def test_killed_task_leaves_no_complete_dataset_and_rerun_completes(tmp_path: Path, tok_dir: Path) -> None:
    run = tmp_path / "run"
    rng_docs = make_docs(6000, seed=5, max_words=300)
    fake_stage(run, "aug", [[{"text": d["content"]} for d in rng_docs]])
    cfg = cfg_for(tok_dir, input_stage="aug", workers=1, batch_docs=64)
    stage = build(tokenize.STAGE, cfg, run)
    group = stage.out_dir
    from ipt_hpc.execution.submit import prepare

    prepare(stage)
    prefix = group / "shard-00000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipt_hpc.launch", "run-shard", "--stage-dir", str(group)],
        cwd=REPO,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not Path(f"{prefix}.bin.partial").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the task and its tokenizer workers
    proc.wait(30)
    bin_path, idx_path = paths(prefix)
    assert not idx_path.exists() and not bin_path.exists(), "a killed task must not leave a complete-looking dataset"
    assert not StageState(group).is_done("shard-00000.jsonl.zst")
    res = run_stage(tokenize.STAGE, cfg, run, "failed")
    assert res["submitted"] == 1
    assert docs_of(prefix)[:3] == [expected_ids(tok_dir, d["content"]) for d in rng_docs[:3]]
    assert len(IndexedDataset(str(prefix))) == 6000


def test_missing_tokenizer_or_input_is_a_clear_error(tmp_path: Path, tok_dir: Path) -> None:
    run = make_raw(tmp_path / "run", 1, docs=3)
    with pytest.raises(IptError, match="no tokenizer given"):
        run_stage(tokenize.STAGE, load_config(None, None, {"tokenize.input_stage": "raw"}), run)
    with pytest.raises(IptError, match="holds no stage output"):
        run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="augmented"), run)
    with pytest.raises(IptError, match="cannot load tokenizer"):
        run_stage(tokenize.STAGE, cfg_for(tmp_path / "nope"), run)


class _MegatronTokenizer:
    """The attributes megatron-core's GPTDataset reads from a tokenizer."""

    def __init__(self, tok_dir: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        self.vocab_size = len(tok)
        self.eod = tok.eos_token_id
        self.pad = tok.pad_token_id
        self.unique_identifiers = {"class": "test", "path": str(tok_dir)}


def test_megatron_builds_blended_gpt_samples_from_merged_groups(tmp_path: Path, tok_dir: Path) -> None:
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    run = make_raw(tmp_path / "run", 2, docs=200)
    fake_stage(run, "aug", [[{"text": f"Q: what is {i}? A: {i}."} for i in range(300)]])
    run_stage(tokenize.STAGE, cfg_for(tok_dir), run)
    run_stage(tokenize.STAGE, cfg_for(tok_dir, input_stage="aug"), run)
    groups = [str(run / "tokens" / "raw"), str(run / "tokens" / "aug")]
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        config = GPTDatasetConfig(
            random_seed=1234,
            sequence_length=32,
            blend=(groups, [0.7, 0.3]),
            split="100,0,0",
            path_to_cache=str(tmp_path / "cache"),
            tokenizer=_MegatronTokenizer(tok_dir),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
        )
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [400, 0, 0], lambda: True, config).build()
        assert len(train) >= 400
        picked = [train.dataset_index[i] for i in range(400)]
        share = sum(1 for p in picked if p == 0) / 400
        assert abs(share - 0.7) < 0.05, share  # the weights are honoured
        sample = train[0]
        assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
        assert int(sample["tokens"].max()) < len(__import__("transformers").AutoTokenizer.from_pretrained(str(tok_dir)))
    finally:
        torch.distributed.destroy_process_group()


def test_cli_tokenize_and_verify_tool(tmp_path: Path, tok_dir: Path) -> None:
    from conftest import run_cli

    run = make_raw(tmp_path / "run", 2, docs=40)
    proc = run_cli(
        "tokenize",
        "--run",
        str(run),
        "--input-stage",
        "raw",
        "--tokenizer",
        str(tok_dir),
        "--executor",
        "local",
        "--workers",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "40 documents" in proc.stderr
    verify = [sys.executable, str(REPO / "tools" / "verify_indexed.py"), str(run / "tokens" / "raw")]
    ok = subprocess.run(verify, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    # corrupt one token of the merged .bin: the verifier must notice
    bin_path = paths(run / "tokens" / "raw")[0]
    data = bytearray(bin_path.read_bytes())
    data[10] ^= 0x7F
    bin_path.write_bytes(bytes(data))
    bad = subprocess.run([*verify, "--samples", "40"], capture_output=True, text=True)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout
