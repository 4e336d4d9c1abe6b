"""A deterministic sample of the raw corpus for calibration, and the corpus's size estimated from it.

Up to ``n`` input files are chosen evenly over the sorted input list; each is read from its start for at
most ``prefix_bytes`` of the file, and its sample documents are spread evenly over that prefix (the same
documents every time). A file read to its end is counted exactly; a longer one is extrapolated from the
documents per file byte of its prefix (compressed bytes for .gz/.zst); files not chosen from the chosen
files' documents per byte. Parquet and Arrow files give their row counts from their own metadata.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ..atomic import atomic_write_bytes
from ..config import ShardConfig
from ..errors import IptError
from ..stages.shard import extract, max_line_bytes
from ..stages.sources import InputFile, Row, discover_inputs, iter_rows, rows_with_file_position

PREFIX_BYTES = 32 << 20


def _rows(inp: InputFile, cfg: ShardConfig) -> Iterator[tuple[Row, int]]:
    """Rows with the file bytes read so far (-1 where the format does not say)."""
    limit = max_line_bytes(cfg)
    if inp.format == "jsonl":
        yield from rows_with_file_position(inp, max_line_bytes=limit)
    else:
        for row in iter_rows(inp, max_line_bytes=limit, hub_split=cfg.hub_split):
            yield row, -1


def _metadata_rows(inp: InputFile) -> int | None:
    """Rows of a Parquet file from its footer, of an Arrow file from its memory-mapped batches (not copied)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if inp.format == "parquet":
        return int(pq.ParquetFile(inp.path).metadata.num_rows)
    if inp.format == "arrow":
        with pa.memory_map(inp.path) as source:
            try:
                return int(pa.ipc.open_stream(source).read_all().num_rows)
            except pa.ArrowInvalid:
                return int(pa.ipc.open_file(source).read_all().num_rows)
    return None


def _prefix(inp: InputFile, cfg: ShardConfig, prefix_bytes: int) -> dict[str, Any]:
    """One pass over a file's prefix: its good documents' positions and text bytes, the bytes it spans."""
    positions, sizes, read, ended = [], [], 0, True
    for row, position in _rows(inp, cfg):
        if prefix_bytes <= position < inp.size:  # (a compressed file read whole in one go is counted whole)
            ended = False
            break
        read = max(read, position)
        _, nbytes, problem = extract(row, inp, cfg)
        if problem is None:
            positions.append(row.pos)
            sizes.append(nbytes)
        if inp.format != "jsonl" and len(positions) >= 10_000:
            ended = False
            break
    return {"positions": positions, "sizes": sizes, "read": read, "ended": ended}


def _keep(row: Row, cfg: ShardConfig) -> dict[str, Any]:
    """The fields of a source row that the shard stage reads (text, own id, kept fields)."""
    names = [cfg.text_field, *([cfg.id_field] if cfg.id_field else []), *cfg.keep_fields]
    return {k: row.record[k] for k in names if k in row.record}


def sample_corpus(cfg: ShardConfig, n: int, out: Path, *, prefix_bytes: int = PREFIX_BYTES) -> dict[str, Any]:
    """Write ``n`` sample documents of the corpus to ``out`` (JSON Lines, the source's own fields) and
    return the corpus estimate: documents, text bytes, bytes per document, and how they were found."""
    if n < 1:
        raise IptError(f"plan --calibrate: needs at least 1 document, got {n}")
    inputs = discover_inputs(cfg.inputs, cfg.format)
    if any(i.format == "hub" for i in inputs):
        raise IptError("plan: a hub dataset cannot be sampled offline; pass a local copy (or --docs N for the count)")
    chosen = sorted(
        {round(k * (len(inputs) - 1) / max(1, min(n, len(inputs)) - 1)) for k in range(min(n, len(inputs)))}
    )
    quota = math.ceil(n / len(chosen))
    docs_found, exact_docs, sizes, rows = 0.0, True, [], []
    per_byte: list[float] = []
    for i in chosen:
        inp = inputs[i]
        pre = _prefix(inp, cfg, prefix_bytes)
        count = len(pre["positions"])
        if count == 0:
            continue
        sizes += pre["sizes"]
        if pre["ended"]:
            total = float(count)
        elif (meta := _metadata_rows(inp)) is not None:
            total = float(meta)  # rows by the file's metadata; bad rows among them show when the shard stage scans
        else:
            exact_docs = False
            total = count * inp.size / max(1, pre["read"])
        docs_found += total
        per_byte.append(total / max(1, inp.size))
        step = max(1, count // quota)
        wanted = set(pre["positions"][::step][:quota])
        for row, _ in _rows(inp, cfg):
            if row.pos in wanted:
                rows.append(_keep(row, cfg))
                wanted.discard(row.pos)
            if not wanted:
                break
    if not rows:
        raise IptError(f"plan: no usable document in the sampled inputs of {cfg.inputs}")
    rows = rows[:n]
    others = [inp for k, inp in enumerate(inputs) if k not in chosen]
    if others:
        exact_docs = False
        docs_found += sum(inp.size for inp in others) * (sum(per_byte) / len(per_byte))
    mean = statistics.fmean(sizes)
    spread = statistics.pstdev(sizes) / mean if len(sizes) > 1 and mean else 0.0
    lines = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    atomic_write_bytes(out, lines)
    return {
        "docs": round(docs_found),
        "docs_exact": exact_docs,
        "text_bytes": round(docs_found * mean),
        "bytes_per_doc": round(mean, 1),
        "bytes_per_doc_cv": round(spread, 3),  # coefficient of variation of document sizes
        "inputs": len(inputs),
        "inputs_read": len(chosen),
        "prefix_docs": len(sizes),
        "sample_docs": len(rows),
        "method": (
            "counted (every input read to its end)"
            if exact_docs
            else f"extrapolated from {len(sizes):,} documents in the first {prefix_bytes >> 20} MiB of"
            f" {len(chosen)} of {len(inputs)} inputs (documents per file byte)"
        ),
    }
