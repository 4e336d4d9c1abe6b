"""Raw corpus inputs: discover files and stream their rows with exact positions.

JSON Lines (optionally .gz / .zst) are read by our own line reader, so a bad record is reported
as ``file:line: reason`` and a huge line never sits whole in memory. Parquet, Arrow and hub
datasets are read through Hugging Face ``datasets`` (streaming, nothing cached); their
positions are 1-based row numbers. A dataset folder written by ``publish`` is read as the Parquet
files of its ``augmented`` config (else ``raw``). See docs/design.md ("Reading the raw corpus").
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson
import zstandard

from ..errors import IptError
from ..records import check_zstd_complete

READ_CHUNK = 1 << 20
EXCERPT_BYTES = 2048
_JSONL = (".jsonl", ".json", ".ndjson")
_COMPRESSION = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
_TABLE = {".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class InputFile:
    """One input of the shard stage (a file, or a hub dataset when ``format == 'hub'``)."""

    path: str
    name: str  # used in record ids and error messages: path relative to the inputs' common root
    format: str  # jsonl | parquet | arrow | hub
    compression: str | None
    size: int
    mtime_ns: int

    @property
    def seekable(self) -> bool:
        return self.format == "jsonl" and self.compression is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _classify(path: Path, fmt: str) -> tuple[str, str | None] | None:
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSION.get(suffixes[-1]) if suffixes else None
    core = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if core in _JSONL:
        found = "jsonl"
    elif core in _TABLE and compression is None:
        found = _TABLE[core]
    else:
        return None
    if fmt not in ("auto", found):
        return None
    return found, compression


def _listed(path: Path) -> bool:
    """Whether a file found in an input folder is corpus data (not hidden, not datasets metadata)."""
    if path.name.startswith((".", "_")):
        return False
    saved_dataset = (path.parent / "state.json").exists() and (path.parent / "dataset_info.json").exists()
    return not saved_dataset or path.suffix == ".arrow"


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not os.path.exists(spec)


def discover_inputs(specs: list[str], fmt: str = "auto") -> list[InputFile]:
    """Expand files, folders (recursively) and globs into a sorted, de-duplicated input list."""
    if not specs:
        raise IptError("no input given: pass --input FILE|DIR|GLOB (or set shard.inputs)")
    if fmt == "hub" or (len(specs) == 1 and fmt == "auto" and _looks_like_hub_name(specs[0])):
        return [InputFile(spec, spec, "hub", None, 0, 0) for spec in specs]
    from .publish import published_files

    found: dict[str, tuple[str, str | None]] = {}
    for spec in specs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise IptError(f"{spec}: no file matches this pattern")
        for match in matches:
            p = Path(match)
            published = published_files(p, ("augmented", "raw")) if fmt in ("auto", "parquet") else None
            if published is not None:  # a dataset folder written by publish: its texts, not its bookkeeping
                kinds = [(q, ("parquet", None)) for q in published[1]]
            elif p.is_dir():
                candidates = sorted(q for q in p.rglob("*") if q.is_file() and _listed(q))
                kinds = [(q, _classify(q, fmt)) for q in candidates]
                kinds = [(q, k) for q, k in kinds if k is not None]
                if not kinds:
                    raise IptError(f"{p}: folder holds no .jsonl/.json(.gz|.zst)/.parquet/.arrow files")
            elif p.is_file():
                kind = _classify(p, fmt)
                if kind is None:
                    raise IptError(
                        f"{p}: unsupported input type (expected .jsonl, .json, .ndjson, optionally .gz or"
                        f" .zst, .parquet or .arrow{'' if fmt == 'auto' else f' for --format {fmt}'})"
                    )
                kinds = [(p, kind)]
            else:
                raise IptError(f"{p}: no such file or folder")
            for q, kind in kinds:
                found[str(q.resolve())] = kind
    paths = sorted(found)
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    inputs = []
    for path in paths:
        st = os.stat(path)
        fmt_, comp = found[path]
        inputs.append(InputFile(path, os.path.relpath(path, root), fmt_, comp, st.st_size, st.st_mtime_ns))
    return inputs


BLANK = object()  # the ``record`` of a blank line: counted, not a record


class Row(NamedTuple):
    """One row of an input: its 1-based position, byte offset (seekable inputs) and content."""

    pos: int
    offset: int
    record: Any  # the parsed JSON value, or None when ``error`` is set
    error: tuple[str, str] | None  # (category, reason) of an unreadable row
    excerpt: bytes  # the raw line (bounded) for quarantine; empty for table rows


class _Oversize(NamedTuple):
    nbytes: int
    head: bytes


def _raw_lines(fh: BinaryIO, limit: int) -> Iterator[bytes | _Oversize]:
    """Lines of a byte stream; a line longer than ``limit`` is skipped and reported, never held."""
    rest = b""
    skipping: _Oversize | None = None
    while chunk := fh.read(READ_CHUNK):
        if skipping is not None:
            nl = chunk.find(b"\n")
            if nl < 0:
                skipping = _Oversize(skipping.nbytes + len(chunk), skipping.head)
                continue
            yield _Oversize(skipping.nbytes + nl, skipping.head)
            skipping = None
            chunk = chunk[nl + 1 :]
        if rest:
            chunk = rest + chunk
        lines = chunk.split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield _Oversize(len(line), line[:EXCERPT_BYTES]) if len(line) > limit else line
        if len(rest) > limit:
            skipping = _Oversize(len(rest), rest[:EXCERPT_BYTES])
            rest = b""
    if skipping is not None:
        yield skipping
    elif rest:
        yield rest


def _open_stream(inp: InputFile, raw: BinaryIO | None = None) -> BinaryIO:
    """The decompressed bytes of ``inp``; from ``raw`` (a compressed input's file, left open) when given."""
    if inp.compression == "gz":
        if raw is not None:
            return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
        return gzip.open(inp.path, "rb")  # type: ignore[return-value]
    if inp.compression == "zst":
        check_zstd_complete(inp.path)  # decoders stop silently at a truncated end
    fh = raw or open(inp.path, "rb")  # noqa: SIM115 - closed by the caller's with-block
    if inp.compression == "zst":
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=raw is None)
        return reader  # type: ignore[return-value]
    return fh


def _parse_line(line: bytes) -> tuple[Any, tuple[str, str] | None]:
    try:
        return orjson.loads(line), None
    except orjson.JSONDecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return None, ("invalid_utf8", f"invalid UTF-8 at byte {uexc.start} of the line")
        if b"\x00" in line:
            return None, ("nul_byte", f"NUL byte at byte {line.index(0)} of the line")
        return None, ("malformed_json", f"malformed JSON ({exc})")


def _jsonl_rows(
    inp: InputFile, start_pos: int, start_offset: int, max_line_bytes: int, raw: BinaryIO | None = None
) -> Iterator[Row]:
    with _open_stream(inp, raw) as fh:
        pos, offset = 1, 0
        if start_offset and inp.seekable:
            fh.seek(start_offset)
            pos, offset = start_pos, start_offset
        for line in _raw_lines(fh, max_line_bytes):
            if isinstance(line, _Oversize):
                if pos >= start_pos:
                    reason = f"line of {line.nbytes} bytes exceeds the limit of {max_line_bytes} bytes"
                    yield Row(pos, offset, None, ("too_large", reason + " (shard.max_doc_bytes)"), line.head)
                offset += line.nbytes + 1
            else:
                if pos >= start_pos:
                    if line.strip():
                        record, error = _parse_line(line)
                        yield Row(pos, offset, record, error, line[:EXCERPT_BYTES])
                    else:
                        yield Row(pos, offset, BLANK, None, b"")
                offset += len(line) + 1
            pos += 1


def _table_rows(inp: InputFile, start_pos: int, hub_split: str) -> Iterator[Row]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise IptError("reading parquet/arrow/hub inputs needs the 'datasets' package") from exc
    datasets.disable_progress_bars()
    try:
        if inp.format == "hub":
            ds = datasets.load_dataset(inp.path, split=hub_split, streaming=True)
        else:
            ds = datasets.load_dataset(inp.format, data_files=inp.path, split="train", streaming=True)
        if start_pos > 1:
            ds = ds.skip(start_pos - 1)
        for pos, record in enumerate(ds, start=start_pos):
            yield Row(pos, -1, record, None, b"")
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as exc:
        if isinstance(exc, IptError):
            raise
        hint = " (offline? set HF_DATASETS_OFFLINE=0 on a node with network)" if inp.format == "hub" else ""
        raise IptError(f"{inp.name}: cannot read {inp.format} input: {exc}{hint}") from exc


def rows_with_file_position(inp: InputFile, *, max_line_bytes: int) -> Iterator[tuple[Row, int]]:
    """A JSON Lines input's rows from its start, each with the bytes of the file read so far (compressed
    bytes for .gz/.zst, to within a read-ahead chunk): how a prefix extrapolates to the whole file."""
    if inp.format != "jsonl":
        raise IptError(f"{inp.name}: file positions are known for JSON Lines inputs only, not {inp.format}")
    if inp.compression is None:
        for row in iter_rows(inp, max_line_bytes=max_line_bytes):
            yield row, row.offset
        return
    try:
        with open(inp.path, "rb") as raw:
            for row in _jsonl_rows(inp, 1, 0, max_line_bytes, raw):
                yield row, raw.tell()
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise IptError(f"{inp.name}: cannot read input ({exc})") from exc


def iter_rows(
    inp: InputFile, *, start_pos: int = 1, start_offset: int = 0, max_line_bytes: int, hub_split: str = "train"
) -> Iterator[Row]:
    """Rows of ``inp`` from position ``start_pos`` (seeking to ``start_offset`` where possible)."""
    if inp.format == "jsonl":
        try:
            yield from _jsonl_rows(inp, start_pos, start_offset, max_line_bytes)
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise IptError(f"{inp.name}: cannot read input ({exc})") from exc
        except IptError as exc:
            raise IptError(f"{inp.name}: cannot read input ({exc})") from exc
    else:
        yield from _table_rows(inp, start_pos, hub_split)
