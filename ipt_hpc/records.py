"""Record I/O: zstd-compressed JSON Lines, streamed, framed at record boundaries, atomic.

File layout written by :class:`RecordWriter` (see docs/records.md):

* a sequence of independent zstd frames (content size and checksum in each), every frame
  ending at a record boundary, so any prefix of whole frames is a readable file;
* frames are cut when their uncompressed content reaches ``frame_bytes``; the records after the
  last such cut are the *tail*: each :meth:`RecordWriter.flush` appends the records written since
  the previous one as a temporary *tail frame*, and the next full frame is written over the tail
  frames. A resume takes the tail frames' records back into the buffer, so the frame layout
  depends only on the records and ``frame_bytes``, never on when the caller flushed or was killed:
  a resumed write yields the same bytes as an uninterrupted one;
* the file is written as ``NAME.partial`` and renamed to ``NAME`` only after a final fsync;
* full frames are compressed on a small process-wide pool of threads (zstd releases the GIL), so the
  caller keeps encoding records while earlier frames compress; frames are independent, so the bytes
  do not depend on the number of threads.

Durability (docs/records.md): after :meth:`RecordWriter.flush` every record written so far is in the
file as the kernel sees it, so a killed process (SIGKILL, OOM, preemption) loses none of them; the
file is fsynced by ``close()``, by ``flush(sync=True)`` and by a ``flush()`` at least ``sync_s``
seconds after the previous fsync, which bounds what a node crash can take.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import zstandard

from .atomic import PARTIAL_SUFFIX, fsync_dir, partial_path
from .errors import IptError, RecordError

DEFAULT_LEVEL = 3
DEFAULT_FRAME_BYTES = 1 << 20
# Level of the temporary tail frames that flush() appends: their records are written again at the real
# level when their frame fills up or at close(), and a resume decompresses and recompresses them, so they
# never reach a finished file. So far down zstd stores raw blocks at memcpy speed.
TAIL_LEVEL = -1000
READ_CHUNK = 1 << 20
# A flush() fsyncs when at least this many seconds passed since the writer's last fsync (0: every flush).
DEFAULT_SYNC_S = 10.0
MAX_THREADS = 4  # frame compressors per process when ``threads`` is left to the writer
_DUMPS_OPTS = orjson.OPT_APPEND_NEWLINE


def default_threads() -> int:
    """Frame compression threads for this process: one per CPU it may use, up to 4, and none on one CPU.

    Its CPUs are its affinity (Slurm's ``--cpus-per-task``), or its share ``OMP_NUM_THREADS`` when that is
    lower (the local executor sets it to CPUs // workers, so two workers on two cores compress in place)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    share = os.environ.get("OMP_NUM_THREADS", "")
    if share.isdigit() and int(share) > 0:
        cpus = min(cpus, int(share))
    return 0 if cpus < 2 else min(cpus, MAX_THREADS)


_local = threading.local()


def _compress(level: int, data: bytes) -> bytes:
    """One permanent frame (on a pool thread: a zstd context per thread and level, reused)."""
    contexts: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("contexts", {})
    cctx = contexts.get(level)
    if cctx is None:
        cctx = contexts[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(data)


class _Pool:
    """The process's frame compressors, made on first use and again in a forked child (threads do not fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0

    def get(self, threads: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._size < threads:
                old = self._executor
                self._executor = ThreadPoolExecutor(threads, thread_name_prefix="ipt-zstd")
                self._size = threads
                if old is not None:
                    old.shutdown(wait=False)
            return self._executor

    def forget(self) -> None:
        self._lock = threading.Lock()
        self._executor, self._size = None, 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


@dataclass(frozen=True)
class FileStats:
    """What a stage manifest records about one finished record file."""

    name: str
    records: int
    bytes: int
    raw_bytes: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Limited(io.RawIOBase):
    """The first ``limit`` bytes of a file (the permanent frames of a partial record file)."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self._fh, self._left = fh, limit
        fh.seek(0)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._left)
        data = self._fh.read(n)
        buf[: len(data)] = data
        self._left -= len(data)
        return len(data)


def new_hash() -> Any:
    """A running hash of a file's bytes, in the kind manifests store (:func:`hash_text` gives its text)."""
    return hashlib.blake2b(digest_size=16)


def hash_text(h: Any) -> str:
    """A :func:`new_hash` as manifests store it."""
    return "blake2b:" + h.hexdigest()


def file_checksum(path: str | os.PathLike[str]) -> str:
    """Checksum of a file's bytes, in the form stored in manifests."""
    h = new_hash()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return hash_text(h)


@dataclass
class _Frame:
    start: int
    end: int
    records: int
    raw_bytes: int
    content: bytes | None  # kept only for a frame shorter than frame_bytes (a tail candidate)


def _walk_frames(fh: BinaryIO, frame_bytes: int) -> tuple[list[_Frame], int, str | None]:
    """Walk the complete frames of a partial file.

    Returns (frames, end of last complete frame, reason the walk stopped early or None).
    """
    dctx = zstandard.ZstdDecompressor()
    frames: list[_Frame] = []
    fh.seek(0)
    pos = 0  # offset of the current frame's first byte
    carry = b""
    eof = False
    while not eof or carry:
        dobj = dctx.decompressobj()
        parts: list[bytes] | None = []
        size = records = consumed = 0
        last = b""
        data = carry
        carry = b""
        done = False
        while True:
            if not data:
                data = fh.read(READ_CHUNK)
                if not data:
                    eof = True
                    break
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as exc:
                return frames, pos, f"damaged frame at byte {pos}: {exc}"
            if out:
                size += len(out)
                records += out.count(b"\n")
                last = out[-1:]
                if size >= frame_bytes:
                    parts = None  # a full frame: no tail candidate, content not needed
                elif parts is not None:
                    parts.append(out)
            if dobj.eof:
                carry = dobj.unused_data
                consumed += len(data) - len(carry)
                done = True
                break
            consumed += len(data)
            data = b""
        if not done:
            if consumed:
                return frames, pos, f"torn frame at byte {pos} ({consumed} bytes)"
            break
        if size and last != b"\n":
            return frames, pos, f"frame at byte {pos} does not end at a record boundary"
        content = b"".join(parts) if parts is not None else None
        frames.append(_Frame(pos, pos + consumed, records, size, content))
        pos += consumed
    return frames, pos, None


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an ``OSError`` raised while writing ``path`` that file's name (a full disk says which file)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


class RecordWriter:
    """Streaming zstd JSONL writer with record-boundary frames, resume and atomic completion.

    ``flush()`` puts every record written so far into the file (in-flight frames, then a tail frame), so
    a killed writer loses none of them, and fsyncs when ``sync_s`` seconds passed since the last fsync (or
    when asked: ``flush(sync=True)``); a killed writer leaves a ``.partial`` whose whole frames are
    readable; ``close()`` fsyncs and renames. ``threads`` frame compressors run beside the caller (``None``:
    :func:`default_threads`; 0: the caller's thread compresses). With ``resume=True`` an existing
    ``.partial`` is reopened: a torn last frame is cut off and :attr:`records` tells how many records
    survived, so the caller continues after them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool = False,
        level: int = DEFAULT_LEVEL,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        fsync: bool = True,
        sync_s: float = DEFAULT_SYNC_S,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        if self.path.exists():
            raise IptError(f"{self.path}: already complete; remove it (or pass --force) to rewrite it")
        if frame_bytes < 1:
            raise ValueError("frame_bytes must be positive")
        if sync_s < 0:
            raise ValueError("sync_s must not be negative")
        self.frame_bytes = frame_bytes
        self._fsync = fsync
        self._sync_s = sync_s
        self._last_sync = time.monotonic()
        self._level = level
        self._threads = default_threads() if threads is None else threads
        self._pool = _POOL.get(self._threads) if self._threads else None
        # frames handed to the pool, oldest first: (compressed frame, records, uncompressed bytes)
        self._inflight: collections.deque[tuple[Future[bytes], int, int]] = collections.deque()
        self._inflight_records = 0
        self._tail_cctx = zstandard.ZstdCompressor(level=TAIL_LEVEL, write_checksum=True, write_content_size=True)
        self._hash = new_hash()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_records = 0
        self._base = 0  # end of the permanent frames; the tail frames start here
        self._tail_len = 0  # size of the tail frames on disk
        self._tail_lines = 0  # entries of _pending already in tail frames on disk
        self._perm_records = 0
        self._perm_raw = 0
        self.recovered_note: str | None = None
        self.busy = False  # True while the file or buffer is being changed (see flush_if_idle)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.partial.exists():
            self._fh = open(self.partial, "r+b")  # noqa: SIM115 - closed in close()/abandon()
            self._recover()
        else:
            self._fh = open(self.partial, "wb")  # noqa: SIM115
        self._closed = False

    # -- state -------------------------------------------------------------------------
    @property
    def records(self) -> int:
        """Records accepted so far (after a resume: the records recovered from disk)."""
        return self._perm_records + self._inflight_records + self._pending_records

    def _recover(self) -> None:
        frames, good_end, problem = _walk_frames(self._fh, self.frame_bytes)
        self.recovered_note = problem
        self._fh.truncate(good_end)
        while frames and frames[-1].content is not None:  # shorter than a full frame: a tail frame
            tail = frames.pop()
            if tail.records:
                self._pending.insert(0, tail.content)
            self._pending_records += tail.records
            self._pending_bytes += tail.raw_bytes
            self._tail_len += tail.end - tail.start
        self._tail_lines = len(self._pending)
        self._base = frames[-1].end if frames else 0
        self._perm_records = sum(f.records for f in frames)
        self._perm_raw = sum(f.raw_bytes for f in frames)
        self._fh.seek(0)
        remaining = self._base
        while remaining:
            chunk = self._fh.read(min(READ_CHUNK, remaining))
            self._hash.update(chunk)
            remaining -= len(chunk)
        self._fh.seek(self._base + self._tail_len)
        self._sync(force=True)

    def written(self) -> Iterator[dict[str, Any]]:
        """Every record accepted so far, in order (after a resume: the recovered ones first).

        For stages whose next steps depend on earlier output (synthesis chains): the file is the truth.
        """
        self.busy = True  # a signal handler's flush must not write the frame this drain is waiting for
        self._drain()
        self._fh.flush()
        self.busy = False
        if self._base:
            with open(self.partial, "rb") as fh:
                raw = io.BufferedReader(_Limited(fh, self._base), READ_CHUNK)
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                for line in io.BufferedReader(reader, READ_CHUNK):
                    yield orjson.loads(line)
        for chunk in self._pending:
            for line in chunk.splitlines():
                yield orjson.loads(line)

    # -- writing -----------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON object)."""
        self._append(orjson.dumps(record, option=_DUMPS_OPTS))

    def write_line(self, line: bytes) -> None:
        """Append one pre-encoded JSON line ending with its single newline."""
        if not line.endswith(b"\n") or line.find(b"\n") != len(line) - 1:
            raise ValueError("write_line needs exactly one JSON line ending in a newline")
        self._append(line)

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        dumps = orjson.dumps
        for record in records:
            self._append(dumps(record, option=_DUMPS_OPTS))

    def _append(self, line: bytes) -> None:
        self.busy = True
        self._pending.append(line)
        self._pending_bytes += len(line)
        self._pending_records += 1
        if self._pending_bytes >= self.frame_bytes:
            self._cut_frame()
        self.busy = False

    def _clear_pending(self) -> None:
        self._pending = []
        self._pending_bytes = self._pending_records = self._tail_lines = 0

    def _cut_frame(self) -> None:
        """The buffer became a full frame: compress it (on the pool, or here) and write what is ready."""
        data, records, raw = b"".join(self._pending), self._pending_records, self._pending_bytes
        if self._pool is None:
            # compressed before the buffered lines are freed: freed first, they let glibc trim the top of the
            # heap, and the next frame faults the pages back in (measured: 1.45x the write time at 100 MB)
            frame = _compress(self._level, data)
            self._clear_pending()
            self._write_permanent(frame, records, raw)
            return
        self._clear_pending()
        self._inflight.append((self._pool.submit(_compress, self._level, data), records, raw))
        self._inflight_records += records
        inflight = self._inflight
        # frames go to disk in order; the caller waits only when more than ``threads`` are in flight
        while inflight and (inflight[0][0].done() or len(inflight) > self._threads):
            self._write_next()

    def _write_next(self) -> None:
        future, records, raw = self._inflight[0]
        frame = future.result()
        self._inflight.popleft()
        self._inflight_records -= records
        self._write_permanent(frame, records, raw)

    def _drain(self) -> None:
        while self._inflight:
            self._write_next()

    def _put(self, frame: bytes) -> None:
        """Write a full frame where the tail frames start (over them, if any)."""
        fh = self._fh
        with _naming(self.partial):
            if self._tail_len:
                fh.seek(self._base)
            fh.write(frame)
            if self._tail_len > len(frame):
                fh.truncate()

    def _write_permanent(self, frame: bytes, records: int, raw: int) -> None:
        self._put(frame)
        self._hash.update(frame)
        self._base += len(frame)
        self._tail_len = 0
        self._perm_records += records
        self._perm_raw += raw

    def _append_tail(self) -> None:
        """The records written since the last flush, as one more tail frame after the others."""
        frame = self._tail_cctx.compress(b"".join(self._pending[self._tail_lines :]))
        with _naming(self.partial):
            self._fh.seek(self._base + self._tail_len)
            self._fh.write(frame)
        self._tail_len += len(frame)
        self._tail_lines = len(self._pending)

    def _sync(self, *, force: bool) -> None:
        with _naming(self.partial):
            self._fh.flush()
            if self._fsync and (force or time.monotonic() - self._last_sync >= self._sync_s):
                os.fsync(self._fh.fileno())
                self._last_sync = time.monotonic()

    def flush(self, *, sync: bool = False) -> int:
        """Put every record written so far into the file, fsynced if ``sync`` or ``sync_s`` has passed since the
        last fsync; returns that record count."""
        self.busy = True
        self._drain()
        if len(self._pending) > self._tail_lines:
            self._append_tail()
        self._sync(force=sync)
        self.busy = False
        return self.records

    @property
    def closed(self) -> bool:
        return self._closed

    def flush_if_idle(self, *, sync: bool = True) -> bool:
        """Flush (and fsync) unless interrupted mid-write (for signal handlers); True if it flushed."""
        if self._closed or self.busy:
            return False
        self.flush(sync=sync)
        return True

    def close(self) -> FileStats:
        """Finish the file: last frame, fsync, rename ``.partial`` to its final name."""
        self.busy = True
        self._drain()
        if self._pending_records or self._base == 0:  # an empty file still gets one (empty) frame
            frame = _compress(self._level, b"".join(self._pending))
            self._write_permanent(frame, self._pending_records, self._pending_bytes)
            self._clear_pending()
        self._sync(force=True)
        self._fh.close()
        self._closed = True
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return FileStats(
            name=self.path.name,
            records=self._perm_records,
            bytes=self._base,
            raw_bytes=self._perm_raw,
            checksum=hash_text(self._hash),
        )

    def abandon(self) -> None:
        """Stop writing without completing; the ``.partial`` stays for a later resume."""
        if not self._closed:
            self._fh.close()
            self._closed = True

    def discard(self) -> None:
        """Stop writing and delete the ``.partial``."""
        self.abandon()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


# -- reading -----------------------------------------------------------------------------
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def check_zstd_complete(path: str | os.PathLike[str]) -> None:
    """Raise if a zstd file does not end exactly at the end of a frame (a truncated file).

    Decoders stop silently at a truncated end; walking the frame and block headers (a few bytes
    per 128 KiB block, nothing decompressed) tells a complete file from a cut one.
    """
    zstd_frames(path)


def zstd_frames(path: str | os.PathLike[str]) -> list[tuple[int, int, int | None]]:
    """``(start, end, content size or None)`` of every frame of a complete zstd file, from its headers.

    Raises like :func:`check_zstd_complete` on a truncated or damaged file; skippable frames have size 0.
    """
    frames: list[tuple[int, int, int | None]] = []
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            fh.seek(pos)
            head = fh.read(18)
            if len(head) < 8:
                raise RecordError(path, None, f"truncated zstd frame at byte {pos}")
            magic = int.from_bytes(head[:4], "little")
            if magic in _SKIPPABLE:
                end = pos + 8 + int.from_bytes(head[4:8], "little")
                frames.append((pos, end, 0))
                pos = end
                continue
            if magic != _ZSTD_MAGIC:
                raise RecordError(path, None, f"not zstd data at byte {pos}")
            try:
                p = pos + zstandard.frame_header_size(head)
                content = zstandard.get_frame_parameters(head).content_size
            except zstandard.ZstdError as exc:
                raise RecordError(path, None, f"bad zstd frame header at byte {pos} ({exc})") from exc
            while True:
                fh.seek(p)
                block = fh.read(3)
                if len(block) < 3:
                    raise RecordError(path, None, f"truncated zstd frame at byte {pos}")
                header = int.from_bytes(block, "little")
                kind = (header >> 1) & 3
                if kind == 3:
                    raise RecordError(path, None, f"corrupt zstd block at byte {p}")
                p += 3 + (1 if kind == 1 else header >> 3)
                if header & 1:
                    break
            p += 4 if head[4] & 0x04 else 0  # content checksum
            if p > size:
                raise RecordError(path, None, f"truncated zstd frame at byte {pos}")
            frames.append((pos, p, None if content == zstandard.CONTENTSIZE_UNKNOWN else content))
            pos = p
    return frames


def iter_chunks(path: str | os.PathLike[str], chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """Decompressed bytes of a complete record file, in chunks, across all its frames."""
    check_zstd_complete(path)
    with open(path, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=False)
        while data := reader.read(chunk):
            yield data


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (without newline) of a chunked byte stream; a last line without newline is kept."""
    rest = b""
    for chunk in chunks:
        if rest:
            chunk = rest + chunk
        lines = chunk.split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw JSON line)`` of a finished record file; errors name file and line."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise IptError(f"{path}: refusing to read an unfinished file")
    lineno = 0
    try:
        for lineno, line in enumerate(split_lines(iter_chunks(path)), start=1):
            yield lineno, line
    except zstandard.ZstdError as exc:
        raise RecordError(path, lineno + 1, f"corrupt or truncated zstd data ({exc})") from exc
    except RecordError as exc:
        raise RecordError(path, None, f"corrupt or truncated zstd data ({exc.reason})") from exc
    except FileNotFoundError as exc:
        raise IptError(f"{path}: no such record file") from exc


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a finished record file, streamed with bounded memory."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise IptError(f"{path}: refusing to read an unfinished file")
    try:
        check_zstd_complete(path)
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except RecordError as exc:
        raise RecordError(path, None, f"corrupt or truncated zstd data ({exc.reason})") from exc
    except FileNotFoundError as exc:
        raise IptError(f"{path}: no such record file") from exc
    loads = orjson.loads
    lineno = 0
    with fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=False)
        try:
            # BufferedReader iterates lines in C; orjson ignores the trailing newline.
            for lineno, line in enumerate(io.BufferedReader(reader, READ_CHUNK), start=1):
                try:
                    record = loads(line)
                except orjson.JSONDecodeError as exc:
                    raise RecordError(path, lineno, f"invalid JSON ({exc})") from exc
                if type(record) is not dict:
                    raise RecordError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
                yield record
        except zstandard.ZstdError as exc:
            raise RecordError(path, lineno + 1, f"corrupt or truncated zstd data ({exc})") from exc


def count_records(path: str | os.PathLike[str]) -> int:
    """Number of records in a finished record file (decompresses, does not parse)."""
    total = 0
    last = b"\n"
    for chunk in iter_chunks(path):
        total += chunk.count(b"\n")
        last = chunk[-1:]
    return total + (last != b"\n")
