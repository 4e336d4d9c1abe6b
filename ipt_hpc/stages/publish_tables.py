"""Arrow tables of a published part, read from a record shard, and the Parquet file they are written to.

Two ways to the same tables (the same Parquet bytes, tested):

* **columns** (:func:`arrow_tables`): pyarrow's JSON reader parses the decompressed shard straight into
  typed columns, in C++ threads, block by block; no Python object per record. Used whenever the part's
  fields map onto Arrow types (``augmented`` and ``synth``).
* **records** (:func:`record_tables`): record by record through :func:`ipt_hpc.records.read_records` and
  ``to_row``. The ``raw`` part takes it (its ``meta`` object is published as JSON text with sorted keys, which
  a JSON reader cannot give back), and so does any shard the JSON reader refuses or finds a required field
  missing in: the record path then names the record (``file:line: reason``) or, for input that Python accepts
  and Arrow does not, publishes it as before.

:class:`ParquetSink` cuts row groups (every ``row_group_rows`` rows or ``row_group_bytes`` of text, whichever
comes first, the same cut whichever way the tables came), counts what the manifest reports, hashes the file
as it is written, and writes on a thread of its own so that parsing the next block overlaps encoding and
compressing this one (pyarrow releases the GIL for both).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import RecordError
from ..records import check_zstd_complete, hash_text, new_hash, read_records

# Bytes of JSON a block of pyarrow's reader parses at once: a record longer than a block makes the reader
# refuse the shard (record path), so this covers shard.max_doc_bytes' 8 MiB documents and their pairs.
JSON_BLOCK = 16 << 20
RECORD_BATCH = 2048  # records per table on the record path


class Refused(Exception):
    """pyarrow's reader could not take this shard as it is: publish it record by record instead."""


def _json_fields(part: str) -> Any:
    """The fields the JSON reader parses for ``part`` (None: the part goes record by record)."""
    import pyarrow as pa

    strings = pa.list_(pa.string())
    return {
        "augmented": pa.schema(
            [
                ("id", pa.string()),
                ("text", pa.string()),
                ("group", pa.string()),
                ("format", pa.string()),
                ("docs", strings),
                ("pairs", pa.int64()),
            ]
        ),
        "synth": pa.schema(
            [
                ("id", pa.string()),
                ("text", pa.string()),
                ("pairs", pa.list_(pa.struct([("Q", pa.string()), ("A", pa.string())]))),
                ("round", pa.int64()),
                ("chain", strings),
                ("error", pa.string()),
            ]
        ),
    }.get(part)


def _required(batch: Any, names: tuple[str, ...]) -> None:
    """Every record has these fields (the JSON reader makes a missing one null): else the record path names it."""
    for name in names:
        if batch.column(name).null_count:
            raise Refused(f"{name!r} missing or null")


def _augmented(batch: Any, schema: Any) -> Any:
    import pyarrow as pa

    _required(batch, ("id", "text", "group", "format", "docs", "pairs"))
    cols = [batch.column(n) for n in ("id", "text", "group", "format", "docs")]
    return pa.Table.from_arrays([*cols, batch.column("pairs").cast(pa.int32())], schema=schema)


def _synth(batch: Any, schema: Any) -> Any:
    import pyarrow as pa

    _required(batch, ("id", "text", "pairs", "round", "chain"))
    pairs = batch.column("pairs")
    values = pairs.values
    if values.null_count or values.field("Q").null_count or values.field("A").null_count:
        raise Refused("a pair without Q or A")
    renamed = pa.StructArray.from_arrays([values.field("Q"), values.field("A")], names=["question", "answer"])
    cols = [
        batch.column("id"),
        batch.column("text"),
        pa.ListArray.from_arrays(pairs.offsets, renamed),
        batch.column("round").cast(pa.int32()),
        batch.column("chain"),
        batch.column("error"),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


CONVERT: dict[str, Callable[[Any, Any], Any]] = {"augmented": _augmented, "synth": _synth}


def arrow_tables(part: str, path: Path, schema: Any) -> Iterator[Any]:
    """The part's tables of one shard through pyarrow's JSON reader; :class:`Refused` if it cannot take it."""
    import pyarrow as pa
    import pyarrow.json as pj

    fields = _json_fields(part)
    if fields is None:
        raise Refused(f"the {part} part is published record by record")
    try:
        check_zstd_complete(path)
        reader = pj.open_json(
            pa.input_stream(str(path), compression="zstd"),
            read_options=pj.ReadOptions(block_size=JSON_BLOCK, use_threads=True),
            parse_options=pj.ParseOptions(explicit_schema=fields, unexpected_field_behavior="ignore"),
        )
        for batch in reader:
            yield CONVERT[part](batch, schema)
    except (pa.ArrowException, RecordError, OSError) as exc:
        raise Refused(str(exc)) from exc


def record_tables(path: Path, schema: Any, to_row: Callable[[Any, Path, int], dict[str, Any]]) -> Iterator[Any]:
    """The part's tables of one shard, record by record (errors name the file and line)."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    for n, rec in enumerate(read_records(path), start=1):
        rows.append(to_row(rec, path, n))
        if len(rows) == RECORD_BATCH:
            yield pa.Table.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


class _HashingFile:
    """The Parquet file's handle: hashes the bytes pyarrow writes (the manifest's checksum) on a thread of
    its own, beside the encoding and compressing of the next pages (pyarrow hands over bytes it owns no more)."""

    def __init__(self, path: Path, *, threaded: bool) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._hash = new_hash()
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._hasher: threading.Thread | None = None
        if threaded:
            self._hasher = threading.Thread(target=self._hash_loop, name="ipt-parquet-hash", daemon=True)
            self._hasher.start()
        self.closed = False

    def _hash_loop(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash.update(chunk)

    def write(self, data: bytes) -> int:
        if self._hasher is None:
            self._hash.update(data)
        else:
            self._chunks.put(data)
        return self._fh.write(data)

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """pyarrow closes the file when the writer closes: flushed and fsynced first (renamed after)."""
        if not self.closed:
            self.closed = True
            self._chunks.put(None)
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:
                self._fh.close()
                if self._hasher is not None:
                    self._hasher.join()

    def checksum(self) -> str:
        """Of every byte written (call after close)."""
        return hash_text(self._hash)


class ParquetSink:
    """Row groups of a part into one Parquet file, written on a thread of its own; counts for the manifest."""

    def __init__(
        self, path: Path, schema: Any, job: Any, text_field: str, dictionary: list[str], *, threaded: bool = True
    ) -> None:
        import pyarrow.parquet as pq

        self.job, self.text_field = job, text_field
        self.records = self.text_bytes = self.pairs = 0
        self.groups: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self._pending: list[Any] = []
        self._pending_rows = self._pending_bytes = 0
        self.file = _HashingFile(path, threaded=threaded)
        self._writer = pq.ParquetWriter(
            self.file,
            schema,
            compression=job.compression,
            use_dictionary=dictionary,  # the short repeated columns; a text column would only try and give up
            write_statistics=False,  # min/max of long texts only bloat the footer
            store_schema=True,  # datasets reads the exact types (lists of structs) back
        )
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:  # a small shard is written faster than a thread starts
            self._thread = threading.Thread(target=self._write_loop, name="ipt-parquet", daemon=True)
            self._thread.start()

    def _write_loop(self) -> None:
        while (table := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write_table(table, row_group_size=table.num_rows)  # exactly one row group
                except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
                    self._error = exc

    def _put(self, table: Any) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._writer.write_table(table, row_group_size=table.num_rows)
        else:
            self._queue.put(table)

    def add(self, table: Any) -> None:
        """Rows in order; a row group is handed to the writer as soon as it is complete."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        sizes = pc.binary_length(table.column(self.text_field)).to_numpy(zero_copy_only=False).astype(np.int64)
        ends = np.cumsum(sizes)  # text bytes up to and including each row
        rows = len(ends)
        self._count(table, int(ends[-1]) if rows else 0)
        start = 0
        while start < rows:
            before = int(ends[start - 1]) if start else 0
            rows_left = self.job.row_group_rows - self._pending_rows
            # first row (from start) whose group reaches row_group_bytes of text
            by_bytes = int(np.searchsorted(ends, before + self.job.row_group_bytes - self._pending_bytes)) - start
            cut = min(rows_left - 1, by_bytes)
            if cut >= rows - start:  # no cut in the rest: it waits for the next table
                self._pending.append(table.slice(start))
                self._pending_rows += rows - start
                self._pending_bytes += int(ends[-1]) - before
                return
            self._pending.append(table.slice(start, cut + 1))
            self._put(pa.concat_tables(self._pending).combine_chunks())
            self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
            start += cut + 1

    def _count(self, table: Any, text_bytes: int) -> None:
        import pyarrow.compute as pc

        self.records += table.num_rows
        self.text_bytes += text_bytes
        names = table.schema.names
        if "num_pairs" in names:  # augmented
            self.pairs += int(pc.sum(table.column("num_pairs")).as_py() or 0)
            for name, counter in (("group", self.groups), ("format", self.formats)):
                for item in pc.value_counts(table.column(name)).to_pylist():  # in order of first appearance
                    counter[item["values"]] += item["counts"]
        elif "pairs" in names:  # synth
            self.pairs += int(pc.sum(pc.list_value_length(table.column("pairs"))).as_py() or 0)

    def close(self) -> None:
        """The last row group, the footer; raises what the writing thread met."""
        import pyarrow as pa

        try:
            if self._pending:
                self._put(pa.concat_tables(self._pending).combine_chunks())
                self._pending = []
        finally:
            self._stop()
        if self._error is not None:
            self.abandon()
            raise self._error
        self._writer.close()
        self.file.close()

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def abandon(self) -> None:
        """Stop without finishing the file (the caller removes it)."""
        self._error = self._error or RuntimeError("abandoned")
        self._stop()
        try:
            self._writer.close()
        finally:
            self.file.close()
