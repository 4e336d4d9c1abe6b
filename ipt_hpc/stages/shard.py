"""The ``shard`` stage: raw corpus -> N zstd JSONL shards balanced by bytes, with a manifest.

Three steps, each resumable (see docs/design.md, "The shard stage"):

1. *scan* (one task per input file): validate every row, write a compact index of the good
   documents (position, byte offset, text bytes) and quarantine or reject the bad ones;
2. *plan* (in the coordinator): cut the global document sequence into N contiguous ranges of
   near-equal text bytes; document j goes to shard ``k`` with ``ceil(k*T/N) <= before_j``;
3. *write* (one task per shard): stream its ranges from the inputs and write the shard atomically.

The manifest is written last, after every shard is durable: it is the stage's completion marker.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .. import __version__
from ..atomic import atomic_write_bytes, read_json, write_json_atomic
from ..config import Config, RecordsConfig, ShardConfig, config_hash
from ..errors import IptError, RecordError
from ..execution import ShardContext, Stage, StageRun, StageState, run_tasks, shard_name
from ..execution.shards import record_options
from ..layout import RunLayout
from ..records import RecordWriter
from .sources import BLANK, InputFile, Row, discover_inputs, iter_rows

INDEX_DTYPE = np.dtype([("pos", "<i8"), ("offset", "<i8"), ("nbytes", "<i8")])


def max_line_bytes(cfg: ShardConfig) -> int:
    """Longest input line accepted: JSON escaping can double a document's bytes."""
    return 2 * cfg.max_doc_bytes + 65536


# -- one document -------------------------------------------------------------------------
def extract(row: Row, inp: InputFile, cfg: ShardConfig) -> tuple[dict[str, Any] | None, int, tuple[str, str] | None]:
    """Turn an input row into an output record, or say why it is bad.

    Returns ``(record, text_bytes, None)`` or ``(None, 0, (category, reason))``.
    """
    if row.error is not None:
        return None, 0, row.error
    rec = row.record
    if not isinstance(rec, dict):
        return None, 0, ("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    field = cfg.text_field
    if field not in rec:
        return None, 0, ("missing_text", f"missing text field {field!r}")
    text = rec[field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        return None, 0, ("text_not_string", f"text field {field!r} is {kind}, not a string")
    if not text.strip():
        return None, 0, ("empty_text", f"text field {field!r} is empty")
    if "\x00" in text:
        return None, 0, ("nul_in_text", f"text field {field!r} contains a NUL character at {text.index(chr(0))}")
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return None, 0, ("invalid_unicode", f"text field {field!r} holds an unpaired surrogate at {exc.start}")
    if nbytes > cfg.max_doc_bytes:
        return None, 0, ("too_large", f"document of {nbytes} bytes exceeds shard.max_doc_bytes={cfg.max_doc_bytes}")
    src = f"{inp.name}:{row.pos}"
    if cfg.id_field is None:
        out: dict[str, Any] = {"id": src, "text": text}
    else:
        own = rec.get(cfg.id_field)
        if not isinstance(own, (str, int)) or isinstance(own, bool) or own == "":
            return None, 0, ("bad_id", f"id field {cfg.id_field!r} is missing or not a string/integer")
        out = {"id": str(own), "text": text, "src": src}
    if cfg.keep_fields:
        missing = [f for f in cfg.keep_fields if f not in rec]
        if missing:
            return None, 0, ("missing_field", f"missing field(s) {missing} named in shard.keep_fields")
        out["meta"] = {f: rec[f] for f in cfg.keep_fields}
    return out, nbytes, None


# -- task specs (picklable) -----------------------------------------------------------------
@dataclass(frozen=True)
class ScanTask:
    out: str
    index: int
    inp: InputFile
    shard: ShardConfig
    records: RecordsConfig


@dataclass(frozen=True)
class WriteTask:
    out: str
    k: int
    num_shards: int
    segments: list[tuple[int, int, int]]  # (input index, first document, document count)
    inputs: list[InputFile]
    shard: ShardConfig
    records: RecordsConfig


def _state(out: str | Path) -> Path:
    return StageState(out).root


def _scan_paths(out: str | Path, index: int) -> tuple[Path, Path]:
    base = _state(out) / "scan" / f"{index:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def scan_file(task: ScanTask) -> dict[str, Any]:
    """Validate one input and index its good documents (a task of the execution layer)."""
    cfg, inp = task.shard, task.inp
    started = time.perf_counter()
    pos, offs, sizes = array("q"), array("q"), array("q")
    bad: Counter[str] = Counter()
    blank = 0
    quarantine: RecordWriter | None = None
    qname = f"quarantine/{task.index:05d}.jsonl.zst"
    try:
        for row in iter_rows(inp, max_line_bytes=max_line_bytes(cfg), hub_split=cfg.hub_split):
            if row.record is BLANK:
                blank += 1
                continue
            _, nbytes, problem = extract(row, inp, cfg)
            if problem is None:
                pos.append(row.pos)
                offs.append(row.offset)
                sizes.append(nbytes)
                continue
            category, reason = problem
            if task.records.on_bad_record == "error":
                raise RecordError(inp.name, row.pos, reason + " (use --on-bad-record quarantine to set it aside)")
            bad[category] += 1
            if quarantine is None:
                quarantine = RecordWriter(Path(task.out) / qname, fsync=task.records.fsync)
            excerpt = row.excerpt.decode("utf-8", "backslashreplace") if row.excerpt else repr(row.record)[:2048]
            quarantine.write(
                {"file": inp.name, "line": row.pos, "category": category, "reason": reason, "excerpt": excerpt}
            )
        qstats = quarantine.close().to_json() if quarantine else None
    except BaseException:
        if quarantine is not None:
            quarantine.discard()
        raise
    index = np.empty(len(pos), dtype=INDEX_DTYPE)
    index["pos"], index["offset"], index["nbytes"] = pos, offs, sizes
    npy, marker = _scan_paths(task.out, task.index)
    npy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(npy, _npy_bytes(index))
    summary = {
        "name": inp.name,
        "docs": len(pos),
        "text_bytes": int(index["nbytes"].sum()),
        "blank_lines": blank,
        "bad": sum(bad.values()),
        "bad_by_reason": dict(sorted(bad.items())),
        "quarantine": qname if qstats else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(marker, summary)
    return summary


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def plan_shards(indexes: list[np.ndarray], num_shards: int) -> list[list[tuple[int, int, int]]]:
    """Contiguous ranges of near-equal text bytes: ``[(input, first doc, count), ...]`` per shard."""
    total = int(sum(int(ix["nbytes"].sum()) for ix in indexes))
    bounds = np.array([-(-k * total // num_shards) for k in range(num_shards)], dtype=np.int64)
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(num_shards)]
    before = 0
    for i, ix in enumerate(indexes):
        sizes = ix["nbytes"]
        if not len(sizes):
            continue
        starts = before + np.cumsum(sizes) - sizes
        sid = np.searchsorted(bounds, starts, side="right") - 1
        for k in np.unique(sid):
            first = int(np.searchsorted(sid, k, side="left"))
            last = int(np.searchsorted(sid, k, side="right"))
            plan[int(k)].append((i, first, last - first))
        before += int(sizes.sum())
    return plan


def write_shard(task: WriteTask) -> dict[str, Any]:
    """Write one shard from its planned ranges, atomically; returns its stats (the caller marks it done)."""
    name = shard_name(task.k, task.num_shards)
    writer = RecordWriter(Path(task.out) / name, **record_options(task.records))
    text_bytes = 0
    try:
        for i, first, count in task.segments:
            inp = task.inputs[i]
            index = np.load(_scan_paths(task.out, i)[0], mmap_mode="r")[first : first + count]
            wanted = index["pos"]
            j = 0
            rows = iter_rows(
                inp,
                start_pos=int(wanted[0]),
                start_offset=int(index["offset"][0]) if inp.seekable else 0,
                max_line_bytes=max_line_bytes(task.shard),
                hub_split=task.shard.hub_split,
            )
            for row in rows:
                if row.pos < wanted[j]:
                    continue
                record, nbytes, problem = extract(row, inp, task.shard)
                if row.pos != wanted[j] or problem is not None:
                    raise RecordError(inp.name, row.pos, "input changed since it was scanned; rerun with --force")
                writer.write(record)  # type: ignore[arg-type]
                text_bytes += nbytes
                j += 1
                if j == count:
                    break
            if j != count:
                raise IptError(f"{inp.name}: input ended early (changed since it was scanned); rerun with --force")
        stats = writer.close().to_json()
    except BaseException:
        writer.discard()
        raise
    stats["text_bytes"] = text_bytes
    return stats


# -- the stage: job, plan (scan + plan, a coordinator step), one shard, manifest ---------------
def stage_config(cfg: Config) -> dict[str, Any]:
    """The part of the configuration that decides the shards' bytes."""
    shard = cfg.shard.model_dump()
    shard.pop("inputs")
    shard.pop("output_folder")
    return {"shard": shard, "records": {"level": cfg.records.level, "frame_bytes": cfg.records.frame_bytes}}


def fingerprint(cfg: Config, inputs: list[InputFile]) -> str:
    ids = [[i.name, i.format, i.compression, i.size, i.mtime_ns] for i in inputs]
    return config_hash({"config": stage_config(cfg), "policy": cfg.records.on_bad_record, "inputs": ids})


class ShardJob(BaseModel):
    """What the shard tasks need: the config that decides the bytes, the bad-record policy and the inputs
    (name, size, mtime: a changed input changes the stage's identity, so its folder is refused without
    --force, as another config is)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: dict[str, Any]
    on_bad_record: str
    inputs: list[dict[str, Any]]
    fingerprint: str

    def shard_config(self) -> ShardConfig:
        return ShardConfig.model_validate(self.config["shard"])

    def input_files(self) -> list[InputFile]:
        return [InputFile(**i) for i in self.inputs]


def shard_job(cfg: Config, layout: RunLayout) -> ShardJob:
    inputs = discover_inputs(cfg.shard.inputs, cfg.shard.format)
    return ShardJob(
        config=stage_config(cfg),
        on_bad_record=cfg.records.on_bad_record,
        inputs=[i.to_json() for i in inputs],
        fingerprint=fingerprint(cfg, inputs),
    )


def scan_and_plan(run: StageRun, cfg: Config, progress: Callable[[str, int, int], None] | None = None) -> None:
    """The coordinator step before the shards: scan every input (tasks of the execution layer; resumable,
    a scanned input keeps its index) and cut the documents into the shards' ranges (``plan.json``)."""
    job: ShardJob = run.stage_config
    out, inputs, state = run.out_dir, job.input_files(), StageState(run.out_dir)
    write_json_atomic(state.root / "started.json", {"time": time.time()})  # the manifest's seconds count from here
    if not any(_scan_paths(out, i)[1].exists() for i in range(len(inputs))):
        shutil.rmtree(out / "quarantine", ignore_errors=True)  # left by a run this folder was cleared of
    todo = [i for i in range(len(inputs)) if not _scan_paths(out, i)[1].exists()]
    tasks = [ScanTask(str(out), i, inputs[i], job.shard_config(), cfg.records) for i in todo]
    run_tasks(
        scan_file,
        tasks,
        labels=[inputs[i].name for i in todo],
        stage="shard/scan",
        cfg=cfg.execution,
        log_dir=state.root / "logs" / "scan",
        on_progress=progress and (lambda: progress("scan", len(state.names("scan")), len(inputs))),
    )
    scans = [read_json(_scan_paths(out, i)[1]) for i in range(len(inputs))]
    if sum(s["docs"] for s in scans) == 0:
        raise IptError(
            f"no usable document in {len(inputs)} input(s); see the quarantine files in {out / 'quarantine'}"
        )
    plan_path = state.root / "plan.json"
    if not plan_path.exists():
        plan = plan_shards([np.load(_scan_paths(out, i)[0]) for i in range(len(inputs))], run.num_shards)
        write_json_atomic(plan_path, {"shards": plan})


@functools.lru_cache(maxsize=2)
def _read_plan(path: str, mtime_ns: int, size: int) -> list[list[list[int]]]:
    """Every shard's ranges, parsed once per process (a task packs many shards) and per version of the file."""
    return read_json(path)["shards"]


def write_planned_shard(job: ShardJob, ctx: ShardContext) -> dict[str, Any]:
    """The stage's per-shard function: shard ``ctx.shard_id`` from its planned ranges."""
    run = ctx.run
    path = StageState(run.out_dir).root / "plan.json"
    st = path.stat()
    plan = _read_plan(str(path), st.st_mtime_ns, st.st_size)
    records = RecordsConfig(**record_options(run), on_bad_record=job.on_bad_record)
    segments = [tuple(seg) for seg in plan[ctx.shard_id]]
    task = WriteTask(
        str(run.out_dir), ctx.shard_id, run.num_shards, segments, job.input_files(), job.shard_config(), records
    )
    return write_shard(task)


def shard_manifest(run: StageRun) -> dict[str, Any]:
    """The finalize step: the manifest (inputs with their scans, every shard's stats, totals), written after
    every shard is durable; it is the stage's completion marker."""
    job: ShardJob = run.stage_config
    out, state, inputs = run.out_dir, StageState(run.out_dir), job.input_files()
    scans = [read_json(_scan_paths(out, i)[1]) for i in range(len(inputs))]
    shards = [state.read("done", shard_name(k, run.num_shards)) or {} for k in range(run.num_shards)]
    by_reason: Counter[str] = Counter()
    for s in scans:
        by_reason.update(s["bad_by_reason"])
    docs = sum(s["docs"] for s in scans)
    started = read_json(state.root / "started.json")["time"]  # this launch's plan step (scans included)
    manifest = {
        "stage": run.stage,
        "tool_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": job.fingerprint,
        "config_hash": config_hash(job.config),
        "config": {**job.config, "on_bad_record": job.on_bad_record},
        "inputs": [{**inp.to_json(), **scan} for inp, scan in zip(inputs, scans, strict=True)],
        "shards": shards,
        "totals": {
            "inputs": len(inputs),
            "shards": run.num_shards,
            "docs": sum(s["records"] for s in shards),
            "text_bytes": sum(s["text_bytes"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "raw_bytes": sum(s["raw_bytes"] for s in shards),
            "blank_lines": sum(s["blank_lines"] for s in scans),
            "bad": sum(by_reason.values()),
            "bad_by_reason": dict(sorted(by_reason.items())),
            "seconds": round(time.time() - started, 3),
        },
        "quarantine": [s["quarantine"] for s in scans if s["quarantine"]],
    }
    if manifest["totals"]["docs"] != docs:
        raise IptError(f"{out}: shards hold {manifest['totals']['docs']} documents, the scan found {docs}")
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


STAGE = Stage(
    name="shard",
    upstream="",
    input=None,
    output=lambda cfg, layout: layout.stage(cfg.shard.output_folder),
    shard_fn=write_planned_shard,
    job=shard_job,
    finalize=shard_manifest,
    count=lambda cfg: cfg.shard.num_shards,
    plan=scan_and_plan,
)


def imbalance(manifest: dict[str, Any]) -> float:
    """Largest shard's text bytes over the mean (1.0 is perfect balance)."""
    sizes = [s["text_bytes"] for s in manifest["shards"]]
    mean = sum(sizes) / len(sizes)
    return max(sizes) / mean if mean else math.nan
