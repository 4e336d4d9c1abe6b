"""publish: a run as a Hugging Face dataset folder (Parquet per shard, the card), loaded back with
``datasets``; determinism and resume through the execution layer; the push's dry run and offline stop;
the reverse path (shard and finetune-synthesizer read a published folder)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from test_fanout import make_raw
from test_templify import make_synth

from ipt_hpc.atomic import read_json
from ipt_hpc.config import load_config
from ipt_hpc.errors import IptError
from ipt_hpc.execution import StageState, build, run_stage, shard_name
from ipt_hpc.execution.submit import prepare
from ipt_hpc.records import read_records
from ipt_hpc.stages import publish, publish_hub, templify

SHARDS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with raw, synth and augmented shards (the real shard and templify stages; rule-made pairs)."""
    run = make_synth(make_raw(tmp_path_factory.mktemp("pub") / "run", SHARDS, docs=150), SHARDS, share=0.6)
    run_stage(templify.STAGE, cfg(), run)
    return run


def cfg(out: Path | None = None, part: str = "augmented", **sets):
    extra = {"execution.backend": "debug", "publish.part": part, "publish.row_group_rows": 16, **sets}
    if out is not None:
        extra["publish.out"] = str(out)
    return load_config(None, None, extra)


def publish_all(run: Path, out: Path, parts=publish.PARTS, **sets) -> dict[str, dict]:
    manifests = {}
    for part in parts:
        manifests[part] = run_stage(publish.STAGE, cfg(out, part, **sets), run)["manifest"]
    publish_hub.write_card(cfg(out, **{"publish.what": list(parts), **sets}), run, out)
    return manifests


def records(run: Path, folder: str) -> list[dict]:
    return [r for k in range(SHARDS) for r in read_records(run / folder / shard_name(k, SHARDS))]


@pytest.fixture(scope="module")
def published(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pub") / "dataset"
    publish_all(run, out)
    return out


def test_every_config_loads_back_with_datasets(run: Path, published: Path) -> None:
    import datasets

    assert sorted(p.name for p in (published / "augmented").glob("*.parquet")) == [
        shard_name(k, SHARDS).replace(".jsonl.zst", ".parquet") for k in range(SHARDS)
    ]
    aug, synth, raw = records(run, "augmented"), records(run, "synth"), records(run, "raw")
    for part, src in (("augmented", aug), ("synth", synth), ("raw", raw)):
        ds = datasets.load_dataset(str(published), part, split="train")
        assert ds.num_rows == len(src), part
        for k in (0, len(src) // 2, len(src) - 1):  # first, middle, last row against the zstd shards
            row, rec = ds[k], src[k]
            assert row["id"] == rec["id"]
            if part == "augmented":
                assert (row["text"], row["group"], row["format"]) == (rec["text"], rec["group"], rec["format"])
                assert row["docs"] == rec["docs"] and row["num_pairs"] == rec["pairs"]
            elif part == "synth":
                assert row["context"] == rec["text"] and row["round"] == rec["round"] and row["chain"] == rec["chain"]
                assert row["pairs"] == [{"question": p["Q"], "answer": p["A"]} for p in rec["pairs"]]
            else:
                meta = json.loads(row["meta"]) if row["meta"] is not None else None
                assert row["text"] == rec["text"] and meta == rec.get("meta") and row["src"] == rec.get("src")
    groups = datasets.load_dataset(str(published), "augmented", split="train")["group"]
    assert sorted(set(groups)) == ["augmented", "raw"] and groups.count("raw") == sum(r["group"] == "raw" for r in aug)
    default = datasets.load_dataset(str(published), split="train")  # the default config is augmented
    assert default.num_rows == len(aug)


def test_streaming_reads_the_same_rows(run: Path, published: Path) -> None:
    import datasets

    stream = datasets.load_dataset(str(published), "synth", split="train", streaming=True)
    ids = [row["id"] for row in stream]
    assert ids == [r["id"] for r in records(run, "synth")]


def test_parquet_row_groups_and_no_timestamps(published: Path) -> None:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(published / "augmented" / "shard-00000.parquet").metadata
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert meta.num_row_groups > 1 and set(rows[:-1]) == {16} and 0 < rows[-1] <= 16
    kv = {k.decode(): v.decode(errors="replace") for k, v in (meta.metadata or {}).items()}
    assert set(kv) == {"ARROW:schema"}  # no writer time, host or pandas metadata; only the Arrow schema
    assert meta.created_by.startswith("parquet-cpp-arrow")


def test_card_metadata_is_valid_for_the_hub(run: Path, published: Path) -> None:
    from huggingface_hub import DatasetCard

    text = (published / "README.md").read_text()
    head = yaml.safe_load(text.split("---\n")[1])
    assert head["license"] == "other" and head["language"] == ["en"]
    assert head["size_categories"] == ["n<1K"] and head["task_categories"] == ["text-generation", "question-answering"]
    documented = {"license", "language", "pretty_name", "size_categories", "task_categories", "tags", "configs",
                  "dataset_info"}  # fmt: skip
    assert set(head) <= documented | {"task_ids", "annotations_creators", "source_datasets"}
    assert [c["config_name"] for c in head["configs"]] == ["augmented", "synth", "raw"]
    assert head["configs"][0]["default"] is True
    assert head["configs"][1]["data_files"] == [{"split": "train", "path": "synth/*.parquet"}]
    info = {i["config_name"]: i for i in head["dataset_info"]}
    assert info["synth"]["features"][2] == {
        "name": "pairs",
        "list": [{"name": "question", "dtype": "string"}, {"name": "answer", "dtype": "string"}],
    }
    assert info["augmented"]["splits"][0]["num_examples"] == len(records(run, "augmented"))
    card = DatasetCard.load(published / "README.md")  # huggingface_hub's own parser, offline
    assert card.data.license == "other" and card.data.pretty_name.startswith("dataset")
    body = card.text
    synth = read_json(run / "synth" / "manifest.json")
    aug = read_json(run / "augmented" / "manifest.json")
    assert synth["config_hash"] in body and aug["config_hash"] in body
    assert f"{aug['totals']['pairs']:,} pairs rendered" in body
    assert "publish --run RUN --out DIR --what augmented,synth,raw" in body
    assert body.count("```") % 2 == 0  # code blocks are closed: renders as markdown


def test_a_killed_publish_resumes_to_identical_files(run: Path, published: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    c = cfg(out, "augmented")
    prepare(build(publish.STAGE, c, run))
    real = publish.publish_shard
    calls = []

    def dies_on_shard_1(job, ctx):
        calls.append(ctx.shard_id)
        if ctx.shard_id == 1:
            (ctx.output_path.parent / (ctx.output_path.name + ".partial")).write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt  # a kill in the middle of the shard
        return real(job, ctx)

    stage = dataclasses.replace(publish.STAGE, shard_fn=dies_on_shard_1)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, c, run)
    state = StageState(out / "augmented")
    assert state.is_done(shard_name(0, SHARDS)) and not state.is_done(shard_name(1, SHARDS))
    run_stage(publish.STAGE, c, run)  # resumes: shard 0 is not redone, 1 and 2 are
    assert len([e for e in state.events(shard_name(0, SHARDS)) if e["event"] == "start"]) == 1
    for k in range(SHARDS):
        name = shard_name(k, SHARDS).replace(".jsonl.zst", ".parquet")
        assert (out / "augmented" / name).read_bytes() == (published / "augmented" / name).read_bytes()
    assert not list((out / "augmented").glob("*.partial"))


def test_a_record_without_its_fields_is_named(tmp_path: Path) -> None:
    from ipt_hpc.execution import launch
    from ipt_hpc.records import RecordWriter

    run = make_raw(tmp_path / "run", 1, docs=5)
    with RecordWriter(run / "augmented" / shard_name(0, 1)) as w:  # a folder no stage marked: only the file
        w.write({"id": "a", "text": "t", "group": "raw", "format": "raw", "docs": ["a"], "pairs": 0})
        w.write({"id": "b", "text": "t", "group": "raw", "docs": ["b"], "pairs": 0})
    with pytest.raises(IptError, match=r"shard-00000.jsonl.zst:2: not a templify record: 'format' is missing"):
        launch(build(publish.STAGE, cfg(tmp_path / "out"), run, num_shards=1), "all", cfg().execution)
    assert not list((tmp_path / "out" / "augmented").glob("*.parquet*"))


def test_the_command_publishes_and_the_push_stops_offline(
    run: Path, published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "dataset"  # the name the card's title comes from, as the fixture's
    base = ("publish", "--run", str(run), "--out", str(out), "--what", "augmented,synth,raw", "--set")
    base = (*base, "publish.row_group_rows=16")
    proc = run_cli(*base, "--executor", "local", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())  # the console (stderr) wraps long lines
    assert "dataset card:" in said and "raw: 150 rows" in said
    for part in publish.PARTS:  # the local executor writes what the debug one did
        for f in (published / part).glob("*.parquet"):
            assert (out / part / f.name).read_bytes() == f.read_bytes()
    card = (out / "README.md").read_text()
    assert card.replace(str(out), "OUT") == (published / "README.md").read_text().replace(str(published), "OUT")
    proc = run_cli(*base, "--repo-id", "org/name", "--push", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split() for line in proc.stderr.splitlines() if line.strip().endswith((".parquet", ".md", ".json"))]
    assert sorted(name for _, name in listed) == sorted(n for n, _ in publish_hub.upload_plan(out))
    assert {name for _, name in listed} >= {"README.md", "augmented/shard-00000.parquet", "raw/manifest.json"}
    assert not any("_state" in name for _, name in listed)
    said = " ".join(proc.stderr.split())
    assert "would upload 13 files" in said and "nothing sent" in said
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_cli(*base, "--repo-id", "org/name", "--push")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: offline (HF_HUB_OFFLINE is set): nothing uploaded; rerun publish --push where the network allows"
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    proc = run_cli(*base, "--repo-id", "org/name", "--push")
    assert proc.returncode == 2 and "cannot reach http://127.0.0.1:9" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / ".cache").exists()  # the large-folder upload never started
    proc = run_cli(*base, "--push")
    assert proc.returncode == 2 and "--repo-id ORG/NAME" in proc.stderr


def test_card_sizes_follow_the_rows() -> None:
    assert [publish_hub.size_category(n) for n in (0, 999, 1000, 123_456, 10**13)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "100K<n<1M",
        "n>1T",
    ]


def test_a_stage_may_write_outside_its_run(run: Path, tmp_path: Path) -> None:
    """The contract's one generalisation: an output folder outside the run is kept absolute, also in the
    stage-run.json that hand-written sbatch arrays (``run-shard``) rebuild the stage from."""
    from ipt_hpc.execution import StageRun
    from ipt_hpc.execution.submit import load_stage_run

    built = build(publish.STAGE, cfg(tmp_path / "rel" / ".." / "ds", "synth"), run)
    assert built.out_dir == (tmp_path / "ds" / "synth") and built.out_dir.is_absolute()
    assert built.in_dir == run / "synth"
    prepare(built)
    assert load_stage_run(built.out_dir).out_dir == built.out_dir
    assert StageRun.from_json(built.to_json()).out_dir == built.out_dir
    assert build(templify.STAGE, cfg(), run).out_folder == "augmented"  # inside the run: relative, as before


# -- the reverse path ---------------------------------------------------------------------------------
def test_shard_reads_a_published_folder(run: Path, published: Path, tmp_path: Path) -> None:
    from conftest import shard_corpus

    def shard(inputs: str, name: str) -> list[dict]:
        sets = {"shard.inputs": [inputs], "shard.num_shards": 2, "shard.id_field": "id", "execution.backend": "debug"}
        shard_corpus(load_config(None, None, sets), tmp_path / name / "raw")
        return [r for k in range(2) for r in read_records(tmp_path / name / "raw" / shard_name(k, 2))]

    again = shard(str(published), "from-dataset")  # the dataset folder: its augmented config
    assert [(r["id"], r["text"]) for r in again] == [(r["id"], r["text"]) for r in records(run, "augmented")]
    assert again[0]["src"] == "shard-00000.parquet:1"
    raw = shard(str(published / "raw"), "from-raw")  # one config's folder
    assert [r["text"] for r in raw] == [r["text"] for r in records(run, "raw")]
    synth_only = tmp_path / "synth-only"
    publish_all(run, synth_only, parts=("synth",))
    with pytest.raises(IptError, match=r"without a augmented or raw config to read here \(it holds synth\)"):
        shard(str(synth_only), "nothing")


def test_finetune_synthesizer_reads_a_published_synth_config(run: Path, published: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from ipt_hpc.model.finetune_synthesizer import read_examples

    want = [{"id": r["id"], "context": r["text"], "pairs": r["pairs"]} for r in records(run, "synth") if r["pairs"]]
    assert read_examples(published) == want and read_examples(published / "synth") == want
    with pytest.raises(IptError, match="without a synth config"):
        read_examples(published / "raw")
    out = tmp_path / "synth-model"
    tiny = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2", "num_kv_heads=2",
            "vocab_size=400", "eval_contexts=0", "threads=1"]  # fmt: skip
    sets = [a for kv in tiny for a in ("--set", f"finetune_synth.{kv}")]
    proc = run_cli("finetune-synthesizer", "--data", str(published), "--out", str(out), "--steps", "2", *sets)
    assert proc.returncode == 0, proc.stderr
    info = read_json(out / "finetune.json")
    assert info["data"]["examples"] == len(want) and info["data"]["checksum"].startswith("sha256:")


def _publish_one(run: Path, part: str, out: Path) -> tuple[dict, bytes]:
    """Shard 0 of ``part`` published into ``out`` (the stage's own per-shard function, as a task runs it)."""
    from ipt_hpc.execution import ShardContext

    c = cfg(out, part)
    stage_run = build(publish.STAGE, c, run)
    prepare(stage_run)
    state = StageState(stage_run.out_dir)
    ctx = ShardContext(stage_run, 0, state, {"attempt": 1, "job": "test", "host": "h", "pid": 0, "started": 0})
    stats = publish.publish_shard(publish.publish_job(c, None), ctx)
    return stats, ctx.output_path.read_bytes()


@pytest.mark.parametrize("part", ["augmented", "synth"])
def test_columns_and_records_give_the_same_file(run: Path, tmp_path: Path, monkeypatch, part: str) -> None:
    """pyarrow's JSON reader (the usual path) and the record path (a shard it refuses) write the same bytes and
    stats; so does the Parquet file written on a thread of its own; the checksum is of the file's bytes."""
    from ipt_hpc.records import file_checksum
    from ipt_hpc.stages import publish_tables

    real, taken = publish_tables.arrow_tables, []

    def columns(*args, **kwargs):
        yield from real(*args, **kwargs)
        taken.append(True)  # read to the end without being refused

    monkeypatch.setattr(publish_tables, "arrow_tables", columns)
    stats, data = _publish_one(run, part, tmp_path / "columns")
    assert taken == [True]
    assert stats["checksum"] == file_checksum(tmp_path / "columns" / part / "shard-00000.parquet")
    monkeypatch.setattr(publish, "THREADED_FROM", 0)
    threaded = _publish_one(run, part, tmp_path / "threaded")
    assert threaded == (stats, data) and taken == [True, True]
    monkeypatch.setattr(publish_tables, "JSON_BLOCK", 512)  # records longer than a block: the reader refuses
    assert _publish_one(run, part, tmp_path / "long") == (stats, data)
    assert taken == [True, True]  # refused this time: the record path wrote it

    def refuse(*args, **kwargs):
        raise publish_tables.Refused("test")
        yield

    monkeypatch.setattr(publish_tables, "arrow_tables", refuse)
    assert _publish_one(run, part, tmp_path / "records") == (stats, data)
    assert stats["records"] == len(list(read_records(run / part / shard_name(0, SHARDS))))


@pytest.mark.parametrize(
    ("part", "bad", "reason"),
    [
        ("synth", {"id": "b", "text": "t", "pairs": [{"Q": "q"}], "round": 1, "chain": []}, "pair 0 is not"),
        ("synth", {"id": "b", "text": "t", "pairs": [], "round": "1", "chain": []}, "'round' is missing or not a int"),
        ("augmented", {"id": "b", "text": 5, "group": "g", "format": "f", "docs": [], "pairs": 0}, "'text' is"),
    ],
)
def test_a_record_the_json_reader_refuses_is_named(tmp_path: Path, part: str, bad: dict, reason: str) -> None:
    from ipt_hpc.execution import launch
    from ipt_hpc.records import RecordWriter

    good = {
        "synth": {"id": "a", "text": "t", "pairs": [{"Q": "q", "A": "a"}], "round": 1, "chain": []},
        "augmented": {"id": "a", "text": "t", "group": "g", "format": "f", "docs": ["a"], "pairs": 1},
    }[part]
    run = make_raw(tmp_path / "run", 1, docs=5)
    folder = {"synth": "synth", "augmented": "augmented"}[part]
    with RecordWriter(run / folder / shard_name(0, 1)) as w:  # a folder no stage marked: only the file
        w.write(good)
        w.write(bad)
    with pytest.raises(IptError, match=rf"shard-00000.jsonl.zst:2: not a \w+ record: {reason}"):
        launch(build(publish.STAGE, cfg(tmp_path / "out", part), run, num_shards=1), "all", cfg().execution)
    assert not list((tmp_path / "out" / part).glob("*.parquet*"))
