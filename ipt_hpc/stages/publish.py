"""The ``publish`` stage: a run's record shards -> Parquet files of a Hugging Face dataset folder.

One stage run per published *part* (``augmented``: templify's texts, ``synth``: the synthesizer's pairs per
context, ``raw``: the shard stage's documents), each a config of the dataset, written to ``OUT/<part>/``
outside the run folder: one ``shard-NNNNN.parquet`` per input shard, row groups cut every
``publish.row_group_rows`` rows (or ``row_group_bytes`` of text) so that a streaming reader holds one at a
time. A shard is written as ``.partial``, fsynced and renamed, and redone whole if interrupted; pyarrow
writes no timestamps, so a rerun gives the same bytes. The card and the upload are :mod:`.publish_hub`.

The reverse path is here too: :func:`published_files` finds a part's Parquet files in a published dataset
folder (the card's ``configs``), which ``shard`` and ``finetune-synthesizer --data`` read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict

from ..atomic import fsync_dir, partial_path
from ..config import Config
from ..errors import IptError, RecordError
from ..execution import ShardContext
from ..execution.stage import Stage
from ..layout import RunLayout

PARTS = ("augmented", "synth", "raw")
SUFFIX = ".parquet"
CARD = "README.md"


class PublishJob(BaseModel):
    """What a publish task needs (JSON-serialisable; hashed into the stage's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    part: Literal["augmented", "synth", "raw"]
    row_group_rows: int
    row_group_bytes: int
    compression: str


# -- the parts: input folder, required record fields, and the row each record becomes ---------------
def input_folder(cfg: Config, layout: RunLayout, part: str) -> Path:
    """The run folder a part is read from (the folders templify and shard were configured to write; with
    ``decontaminate.enabled``, the decontaminated ones the pipeline trained on)."""
    folder = {
        "augmented": cfg.templify.output_folder,
        "synth": cfg.templify.input_stage,
        "raw": cfg.shard.output_folder,
    }[part]
    if cfg.decontaminate.enabled and part != "augmented":
        from .decontaminate import clean_folder

        folder = clean_folder(folder)
    return layout.stage(folder)


REQUIRED: dict[str, dict[str, type]] = {
    "augmented": {"id": str, "text": str, "group": str, "format": str, "docs": list, "pairs": int},
    "synth": {"id": str, "text": str, "pairs": list, "round": int, "chain": list},
    "raw": {"id": str, "text": str},
}


def _augmented(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "text", "group", "format", "docs")
    return {**{k: rec[k] for k in keys}, "num_pairs": rec["pairs"]}


def _synth(rec: dict[str, Any]) -> dict[str, Any]:
    pairs = [{"question": p["Q"], "answer": p["A"]} for p in rec["pairs"]]  # to_row checked both
    return {
        "id": rec["id"],
        "context": rec["text"],
        "pairs": pairs,
        "round": rec["round"],
        "chain": rec["chain"],
        "error": rec.get("error"),
    }


def _raw(rec: dict[str, Any]) -> dict[str, Any]:
    meta = rec.get("meta")
    dumped = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode() if meta is not None else None
    return {"id": rec["id"], "text": rec["text"], "src": rec.get("src"), "meta": dumped}


ROWS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"augmented": _augmented, "synth": _synth, "raw": _raw}
TEXT_FIELD = {"augmented": "text", "synth": "context", "raw": "text"}


def schema(part: str) -> Any:
    """The Arrow schema of a part's rows (the dataset config's features)."""
    import pyarrow as pa

    strings = pa.list_(pa.string())
    fields = {
        "augmented": [
            ("id", pa.string()),
            ("text", pa.string()),
            ("group", pa.string()),
            ("format", pa.string()),
            ("docs", strings),
            ("num_pairs", pa.int32()),
        ],
        "synth": [
            ("id", pa.string()),
            ("context", pa.string()),
            ("pairs", pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))),
            ("round", pa.int32()),
            ("chain", strings),
            ("error", pa.string()),
        ],
        "raw": [("id", pa.string()), ("text", pa.string()), ("src", pa.string()), ("meta", pa.string())],
    }[part]
    return pa.schema(fields)


WRITER = {"augmented": "templify", "synth": "synthesize", "raw": "shard"}


def to_row(part: str, rec: Any, path: Path, line: int) -> dict[str, Any]:
    """The dataset row of one record, or a :class:`RecordError` naming the field it lacks."""
    if not isinstance(rec, dict):
        raise RecordError(path, line, f"not a {WRITER[part]} record (not a JSON object)")
    for key, kind in REQUIRED[part].items():
        if not isinstance(rec.get(key), kind):
            raise RecordError(path, line, f"not a {WRITER[part]} record: {key!r} is missing or not a {kind.__name__}")
    if part == "synth":
        for k, pair in enumerate(rec["pairs"]):
            if not (isinstance(pair, dict) and isinstance(pair.get("Q"), str) and isinstance(pair.get("A"), str)):
                raise RecordError(path, line, f"not a synthesize record: pair {k} is not {{'Q': text, 'A': text}}")
    return ROWS[part](rec)


# -- one shard --------------------------------------------------------------------------------------
DICTIONARY = {"augmented": ["group", "format"], "synth": ["error"], "raw": ["src"]}  # short repeated columns
THREADED_FROM = 1 << 20  # compressed input bytes from which the Parquet file is written on a thread of its own


def publish_shard(job: PublishJob, ctx: ShardContext) -> dict[str, Any]:
    """One input shard -> one Parquet file (a task of the execution layer; redone whole if interrupted)."""
    from .publish_tables import Refused, arrow_tables

    out, partial, sch = ctx.output_path, partial_path(ctx.output_path), schema(job.part)
    try:
        sink = _write(job, ctx, partial, sch, arrow_tables(job.part, ctx.input_path, sch))
    except Refused:  # pyarrow's reader cannot take it: record by record, which names a bad record
        sink = _write(job, ctx, partial, sch, None)
    os.replace(partial, out)
    fsync_dir(out.parent)
    stats: dict[str, Any] = {
        "name": out.name,
        "records": sink.records,
        "bytes": out.stat().st_size,
        "text_bytes": sink.text_bytes,
        "checksum": sink.file.checksum(),  # of the bytes written, as every manifest stores it
    }
    if job.part != "raw":
        stats["pairs"] = sink.pairs
    if job.part == "augmented":
        stats.update(groups=dict(sink.groups), formats=dict(sink.formats))
    return stats


def _write(job: PublishJob, ctx: ShardContext, partial: Path, sch: Any, tables: Any) -> Any:
    """The shard's tables (record by record when ``tables`` is None) into ``partial``, closed and fsynced."""
    from .publish_tables import ParquetSink, record_tables

    part = job.part
    partial.unlink(missing_ok=True)  # an interrupted attempt: Parquet has no resumable tail
    if tables is None:
        tables = record_tables(ctx.input_path, sch, functools.partial(to_row, part))
    threaded = ctx.input_path.stat().st_size >= THREADED_FROM
    sink = ParquetSink(partial, sch, job, TEXT_FIELD[part], DICTIONARY[part], threaded=threaded)
    try:
        for table in tables:
            reported = sink.records // 1000
            sink.add(table)
            if sink.records // 1000 > reported:  # progress every 1,000 records (a small shard writes none)
                ctx.report(sink.records)
        sink.close()
    except BaseException:
        sink.abandon()
        partial.unlink(missing_ok=True)  # a bad record: no half file left behind
        raise
    return sink


# -- coordinator ------------------------------------------------------------------------------------
def publish_job(cfg: Config, layout: RunLayout) -> PublishJob:
    p = cfg.publish
    if not p.out:
        raise IptError("publish: say where to write the dataset folder: --out DIR (publish.out)")
    return PublishJob(
        part=p.part, row_group_rows=p.row_group_rows, row_group_bytes=p.row_group_bytes, compression=p.compression
    )


def output_folder(cfg: Config, layout: RunLayout) -> Path:
    """``OUT/<part>``: the part's config folder in the dataset folder (outside the run)."""
    if not cfg.publish.out:
        raise IptError("publish: say where to write the dataset folder: --out DIR (publish.out)")
    return Path(cfg.publish.out) / cfg.publish.part


STAGE = Stage(
    name="publish",
    upstream="the stage that writes it (shard, synthesize or templify)",
    input=lambda cfg, layout: input_folder(cfg, layout, cfg.publish.part),
    output=output_folder,
    shard_fn=publish_shard,
    job=publish_job,
    out_suffix=SUFFIX,
)


# -- the reverse path: reading a published dataset folder --------------------------------------------
def card_metadata(folder: Path) -> dict[str, Any] | None:
    """The YAML metadata of the dataset card ``folder/README.md`` (None without a card or metadata)."""
    card = folder / CARD
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    head, sep, _ = text[3:].partition("\n---")
    if not sep:
        return None
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError as exc:
        raise IptError(f"{card}: its YAML metadata does not parse ({exc})") from exc
    return data if isinstance(data, dict) else None


def config_files(folder: Path) -> dict[str, list[Path]] | None:
    """``{config: its data files}`` of a published dataset folder (its card's ``configs``), else None."""
    meta = card_metadata(folder)
    if not meta or not isinstance(meta.get("configs"), list):
        return None
    out: dict[str, list[Path]] = {}
    for entry in meta["configs"]:
        name, files = entry.get("config_name"), entry.get("data_files")
        specs = [files] if isinstance(files, str) else [f["path"] if isinstance(f, dict) else f for f in files or []]
        paths: list[Path] = []
        for spec in specs:
            paths += sorted(folder.glob(spec))
        out[str(name)] = paths
    return out


def published_files(path: str | os.PathLike[str], wanted: Sequence[str]) -> tuple[str, list[Path]] | None:
    """``(config, Parquet files)`` of the first of ``wanted`` that a published dataset holds.

    ``path`` is the dataset folder (with its card) or one config's sub-folder; None when it is neither (an
    ordinary input). A published folder that holds none of ``wanted`` is an error naming what it holds.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    configs = config_files(path)
    names = list(wanted)
    if configs is None and path.name in PARTS:
        configs = config_files(path.parent)
        if configs is not None:
            names = [path.name] if path.name in wanted else []
    if configs is None:
        return None
    for name in names:
        if configs.get(name):
            return name, configs[name]
    held = ", ".join(sorted(k for k, v in configs.items() if v)) or "no data files"
    raise IptError(f"{path}: a published dataset without a {' or '.join(wanted)} config to read here (it holds {held})")
