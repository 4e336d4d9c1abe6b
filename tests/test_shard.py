"""The shard stage: determinism, balance, exactly-once, every bad-input case, resume, formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard
from conftest import make_docs, run_cli, shard_corpus, write_jsonl

from ipt_hpc.atomic import read_json
from ipt_hpc.config import load_config
from ipt_hpc.errors import IptError, RecordError
from ipt_hpc.execution import TaskFailures
from ipt_hpc.records import file_checksum, read_records
from ipt_hpc.stages import shard


def cfg_for(inputs: list[Path], **sets: object):
    overrides = {
        "shard.inputs": [str(p) for p in inputs],
        "shard.text_field": "content",
        "execution.backend": "debug",
        **sets,
    }
    return load_config(None, None, overrides)


def shard_records(out: Path) -> list[dict]:
    recs = []
    for path in sorted(out.glob("shard-*.jsonl.zst")):
        recs.extend(read_records(path))
    return recs


def test_every_document_exactly_once_in_order_with_stable_ids(corpus: Path, tmp_path: Path) -> None:
    cfg = cfg_for([corpus], **{"shard.num_shards": 7, "shard.keep_fields": ["url"]})
    manifest = shard_corpus(cfg, tmp_path / "raw")
    recs = shard_records(tmp_path / "raw")
    docs = make_docs(300, seed=1)
    assert [r["text"] for r in recs] == [d["content"] for d in docs]
    expected_ids = [f"a.jsonl:{i + 1}" for i in range(180)] + [f"b.jsonl.gz:{i + 1}" for i in range(120)]
    assert [r["id"] for r in recs] == expected_ids
    assert [r["meta"]["url"] for r in recs] == [d["url"] for d in docs]
    assert manifest["totals"]["docs"] == 300
    assert len(manifest["shards"]) == 7
    for entry in manifest["shards"]:
        assert entry["checksum"] == file_checksum(tmp_path / "raw" / entry["name"])
        assert entry["records"] == sum(1 for _ in read_records(tmp_path / "raw" / entry["name"]))


def test_shards_are_balanced_by_bytes(tmp_path: Path) -> None:
    docs = make_docs(2000, seed=2, max_words=200)
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    manifest = shard_corpus(cfg_for([inp], **{"shard.num_shards": 16}), tmp_path / "raw")
    sizes = [s["text_bytes"] for s in manifest["shards"]]
    biggest_doc = max(len(d["content"].encode()) for d in docs)
    assert max(sizes) - min(sizes) <= 2 * biggest_doc
    assert sum(sizes) == sum(len(d["content"].encode()) for d in docs)


def test_deterministic_byte_identical_shards(corpus: Path, tmp_path: Path) -> None:
    cfg = cfg_for([corpus], **{"shard.num_shards": 5})
    a = shard_corpus(cfg, tmp_path / "a")
    b = shard_corpus(cfg_for([corpus], **{"shard.num_shards": 5, "execution.workers": 2}), tmp_path / "b")
    for sa, sb in zip(a["shards"], b["shards"], strict=True):
        assert (tmp_path / "a" / sa["name"]).read_bytes() == (tmp_path / "b" / sb["name"]).read_bytes()
    assert a["fingerprint"] == b["fingerprint"]


def test_local_executor_matches_debug_executor(corpus: Path, tmp_path: Path) -> None:
    a = shard_corpus(cfg_for([corpus], **{"shard.num_shards": 3}), tmp_path / "a")
    cfg = cfg_for([corpus], **{"shard.num_shards": 3, "execution.backend": "local", "execution.workers": 2})
    b = shard_corpus(cfg, tmp_path / "b")
    assert [s["checksum"] for s in a["shards"]] == [s["checksum"] for s in b["shards"]]
    assert list((tmp_path / "b" / "_state" / "logs").rglob("*_log.out")), "submitit logs live in the run dir"


def test_more_shards_than_documents(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_docs(3))
    manifest = shard_corpus(cfg_for([inp], **{"shard.num_shards": 5}), tmp_path / "raw")
    assert sorted(s["records"] for s in manifest["shards"]) == [0, 0, 1, 1, 1]
    assert len(shard_records(tmp_path / "raw")) == 3


def test_custom_id_field_and_src(tmp_path: Path) -> None:
    docs = [{"content": f"doc {i}", "doc_id": f"X{i}"} for i in range(4)]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    shard_corpus(cfg_for([inp], **{"shard.num_shards": 1, "shard.id_field": "doc_id"}), tmp_path / "raw")
    recs = shard_records(tmp_path / "raw")
    assert [(r["id"], r["src"]) for r in recs] == [(f"X{i}", f"in.jsonl:{i + 1}") for i in range(4)]


# -- bad input ------------------------------------------------------------------------------
GOOD = json.dumps({"content": "a good document"}).encode()
BAD_LINES = {
    "malformed_json": (b'{"content": "unterminated', "malformed JSON"),
    "missing_text": (b'{"body": "no text field"}', "missing text field 'content'"),
    "text_not_string": (b'{"content": 42}', "is int, not a string"),
    "null_text": (b'{"content": null}', "is null, not a string"),
    "invalid_utf8": (b'{"content": "caf\xe9"}', "invalid UTF-8 at byte 16"),
    "empty_text": (b'{"content": "   "}', "is empty"),
    "nul_byte": (b'{"content": "a\x00b"}', "NUL byte at byte 14"),
    "nul_in_text": (b'{"content": "a\\u0000b"}', "contains a NUL character"),
    "not_an_object": (b'["content"]', "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_error_names_file_and_line(tmp_path: Path, case: str) -> None:
    line, reason = BAD_LINES[case]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join([GOOD, GOOD, line, GOOD]) + b"\n")
    out = tmp_path / "raw"
    with pytest.raises(TaskFailures) as err:
        shard_corpus(cfg_for([inp], **{"shard.num_shards": 2}), out)
    message = str(err.value)
    assert "\n  - in.jsonl:3: " in message and reason in message
    assert not list(out.glob("shard-*")), "no shard is written when the input is bad"
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_quarantined_and_counted(tmp_path: Path, case: str) -> None:
    line, reason = BAD_LINES[case]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join([GOOD, line, GOOD, line, GOOD]) + b"\n")
    out = tmp_path / "raw"
    manifest = shard_corpus(cfg_for([inp], **{"shard.num_shards": 2, "records.on_bad_record": "quarantine"}), out)
    category = "text_not_string" if case == "null_text" else case
    assert manifest["totals"]["docs"] == 3
    assert manifest["totals"]["bad"] == 2
    assert manifest["totals"]["bad_by_reason"] == {category: 2}
    quarantined = list(read_records(out / manifest["quarantine"][0]))
    assert [(q["file"], q["line"], q["category"]) for q in quarantined] == [
        ("in.jsonl", 2, category),
        ("in.jsonl", 4, category),
    ]
    assert reason in quarantined[0]["reason"]
    assert len(shard_records(out)) == 3


def test_huge_document_is_rejected_without_loading_it(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    big = b'{"content": "' + b"x" * (50 << 20) + b'"}'
    inp.write_bytes(b"\n".join([GOOD, big, GOOD]) + b"\n")
    with pytest.raises(TaskFailures, match=r"in\.jsonl:2: line of 52428815 bytes exceeds the limit"):
        shard_corpus(cfg_for([inp]), tmp_path / "raw")
    cfg = cfg_for([inp], **{"records.on_bad_record": "quarantine", "shard.num_shards": 1})
    manifest = shard_corpus(cfg, tmp_path / "raw2")
    assert manifest["totals"]["bad_by_reason"] == {"too_large": 1}
    q = next(read_records(tmp_path / "raw2" / manifest["quarantine"][0]))
    assert len(q["excerpt"]) <= 2048  # the quarantine keeps an excerpt, not 50 MB


def test_document_over_max_doc_bytes(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"content": "a" * 100}, {"content": "b" * 5000}])
    with pytest.raises(TaskFailures, match=r"in\.jsonl:2: document of 5000 bytes exceeds shard.max_doc_bytes=1000"):
        shard_corpus(cfg_for([inp], **{"shard.max_doc_bytes": 1000}), tmp_path / "raw")


def test_blank_lines_are_counted_not_records(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(GOOD + b"\n\n  \n" + GOOD + b"\n\n")
    manifest = shard_corpus(cfg_for([inp], **{"shard.num_shards": 1}), tmp_path / "raw")
    assert manifest["totals"]["docs"] == 2
    assert manifest["totals"]["blank_lines"] == 3
    assert [r["id"] for r in shard_records(tmp_path / "raw")] == ["in.jsonl:1", "in.jsonl:4"]


def test_no_usable_document(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"content": ""}\n')
    with pytest.raises(IptError, match="no usable document"):
        shard_corpus(cfg_for([inp], **{"records.on_bad_record": "quarantine"}), tmp_path / "raw")


def test_truncated_compressed_inputs_are_errors(tmp_path: Path) -> None:
    payload = b"\n".join([GOOD] * 50) + b"\n"
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(payload)[:-12])
    with pytest.raises(TaskFailures, match=r"in\.jsonl\.gz: cannot read input"):
        shard_corpus(cfg_for([gz]), tmp_path / "raw")
    zst = tmp_path / "in.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(payload)[:-6])
    with pytest.raises(TaskFailures, match=r"in\.jsonl\.zst: cannot read input.*truncated"):
        shard_corpus(cfg_for([zst]), tmp_path / "raw2")


# -- formats --------------------------------------------------------------------------------
def test_zst_parquet_and_arrow_inputs(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(40, seed=4)
    folder = tmp_path / "mixed"
    folder.mkdir()
    blob = b"".join(json.dumps(d).encode() + b"\n" for d in docs[:10])
    (folder / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    pq.write_table(pa.table({"content": [d["content"] for d in docs[10:25]]}), folder / "b.parquet")
    datasets.Dataset.from_dict({"content": [d["content"] for d in docs[25:]]}).save_to_disk(str(folder / "c"))
    manifest = shard_corpus(cfg_for([folder], **{"shard.num_shards": 3}), tmp_path / "raw")
    recs = shard_records(tmp_path / "raw")
    assert [r["text"] for r in recs] == [d["content"] for d in docs]
    formats = {i["name"]: i["format"] for i in manifest["inputs"]}
    assert formats["a.jsonl.zst"] == "jsonl" and formats["b.parquet"] == "parquet"
    assert formats["c/data-00000-of-00001.arrow"] == "arrow"
    assert recs[10]["id"] == "b.parquet:1"


def test_parquet_null_text_is_a_bad_record(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one", None, "three"]}), tmp_path / "t.parquet")
    with pytest.raises(TaskFailures, match=r"t\.parquet:2: text field 'content' is null"):
        shard_corpus(cfg_for([tmp_path / "t.parquet"]), tmp_path / "raw")


def test_missing_and_unsupported_inputs(tmp_path: Path) -> None:
    with pytest.raises(IptError, match="no such file or folder"):
        shard_corpus(cfg_for([tmp_path / "nope.jsonl"]), tmp_path / "raw")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(IptError, match="unsupported input type"):
        shard_corpus(cfg_for([tmp_path / "x.csv"]), tmp_path / "raw")
    with pytest.raises(IptError, match="no file matches"):
        shard_corpus(cfg_for([tmp_path / "*.jsonl"]), tmp_path / "raw")


# -- idempotence and resume -----------------------------------------------------------------
def test_rerun_is_a_no_op_and_other_config_is_refused(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    first = shard_corpus(cfg_for([corpus], **{"shard.num_shards": 4}), out)
    again = shard_corpus(cfg_for([corpus], **{"shard.num_shards": 4}), out)
    assert again == first
    with pytest.raises(IptError, match="holds shard output of another config"):
        shard_corpus(cfg_for([corpus], **{"shard.num_shards": 6}), out)
    forced = shard_corpus(cfg_for([corpus], **{"shard.num_shards": 6}), out, force=True)
    assert len(forced["shards"]) == 6
    assert len(list(out.glob("shard-*.jsonl.zst"))) == 6


def test_interrupted_stage_resumes_only_missing_shards(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    cfg = cfg_for([corpus], **{"shard.num_shards": 4})
    ref = shard_corpus(cfg, out)
    # simulate a crash during the write step: one shard unfinished, no manifest yet
    name = ref["shards"][2]["name"]
    (out / name).rename(out / (name + ".partial"))
    (out / "_state" / "done" / (name + ".json")).unlink()
    (out / "manifest.json").unlink()
    untouched = (out / ref["shards"][0]["name"]).stat().st_mtime_ns
    resumed = shard_corpus(cfg, out)
    assert [s["checksum"] for s in resumed["shards"]] == [s["checksum"] for s in ref["shards"]]
    assert (out / ref["shards"][0]["name"]).stat().st_mtime_ns == untouched
    assert not (out / (name + ".partial")).exists()


def test_changed_input_after_scan_is_detected(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_docs(20))
    out = tmp_path / "raw"
    cfg = cfg_for([inp], **{"shard.num_shards": 2})
    shard_corpus(cfg, out)
    for p in out.glob("shard-*"):
        p.unlink()
    for p in (out / "_state" / "done").iterdir():
        p.unlink()
    (out / "manifest.json").unlink()
    data = inp.read_bytes().replace(b'"content": "', b'"content": 1, "x": "', 1)
    inp.write_bytes(data)
    with pytest.raises(IptError, match="holds shard output of another config"):
        shard_corpus(cfg_for([inp], **{"shard.num_shards": 2}), out)


def test_write_task_detects_input_changed_since_scan(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", make_docs(20))
    out = tmp_path / "raw"
    cfg = cfg_for([inp], **{"shard.num_shards": 2})
    inputs = shard.discover_inputs(cfg.shard.inputs)
    shard.scan_file(shard.ScanTask(str(out), 0, inputs[0], cfg.shard, cfg.records))
    inp.write_bytes(inp.read_bytes().replace(b'"content": "', b'"content": 7, "y": "', 1))
    plan = shard.plan_shards([__import__("numpy").load(out / "_state" / "scan" / "00000.npy")], 2)
    task = shard.WriteTask(str(out), 0, 2, plan[0], inputs, cfg.shard, cfg.records)
    with pytest.raises(RecordError, match=r"in\.jsonl:1: input changed since it was scanned"):
        shard.write_shard(task)
    assert not list(out.glob("shard-*")), "a failed shard leaves no file behind"


# -- CLI ------------------------------------------------------------------------------------
def test_cli_runs_demo_config_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    proc = run_cli("shard", "--config", "configs/demo.yaml", "--out", str(out), "--executor", "debug")
    assert proc.returncode == 0, proc.stderr
    manifest = read_json(out / "manifest.json")
    assert manifest["totals"]["docs"] == 428
    assert "manifest:" in proc.stderr


def test_cli_error_is_one_clear_line(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(GOOD + b"\n{bad\n")
    proc = run_cli("shard", "--input", str(inp), "--text-field", "content", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "in.jsonl:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_dry_run_writes_nothing(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    proc = run_cli("shard", "--input", str(corpus), "--num-shards", "9", "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "2 input(s)" in proc.stderr and "9 shards" in proc.stderr
    assert not out.exists()


def test_cli_help() -> None:
    for args in (["--help"], ["shard", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0
        assert "usage:" in proc.stdout
    assert "examples:" in run_cli("shard", "--help").stdout
