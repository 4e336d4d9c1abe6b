"""Benchmark record I/O (zstd JSONL) against plain json/orjson + zstandard and raw zstd.

Usage (with the project's venv python, e.g. ``.venv/bin/python``)::

    python tools/bench_records.py --mb 100
    python tools/bench_records.py --mb 20 --repeat 5 --dir /scratch --breakdown

``--breakdown`` adds rows that split ours' write cost: the frames compressed on the caller's thread
(``threads=0``), an fsync at every flush (``sync_s=0``, the promise before issue 32), and no flush until close.

Variants, all at zstd level 3, all timed on the same in-memory records (generation is not timed):

* ``ours``: :class:`ipt_hpc.records.RecordWriter` with its defaults (1 MiB frames, ``fsync=True``, an fsync
  at most every ``sync_s`` = 10 s and at close, frames compressed on ``threads`` = one per CPU up to 4),
  ``flush()`` every ``--flush-every`` records as a stage would, then ``close()``;
  read back with :func:`ipt_hpc.records.read_records` (yields dicts).
* ``json+zstd``: ``(json.dumps(rec) + "\\n").encode()`` into ``ZstdCompressor(level=3).stream_writer(fh)``;
  read with ``stream_reader`` + ``io.TextIOWrapper`` line iteration + ``json.loads``.
* ``orjson+zstd``: the same with orjson (the peer using our JSON codec).
* ``raw zstd``: the JSONL bytes already in memory, compressed one-shot (``compress``) and streamed
  (``stream_writer``, 1 MiB writes) to a file; read back one-shot (``decompress(fh.read())``) and
  streamed (``stream_reader.read(1 MiB)``). The faster raw row per direction is the reference ("the limit").

Every baseline ends its write with one flush + fsync (``--no-baseline-fsync`` drops it), so the
reference is durable too; ``ours`` additionally pays its periodic ``flush()`` (in-flight frames and the
tail frame written to the file, which a killed process cannot lose).
MB/s is always the size of the uncompressed JSONL as orjson encodes it (what ``ours`` and raw zstd
write) divided by the time, so MB/s ratios equal time ratios. 1 MB = 10**6 bytes. Reads come from
the page cache (the files were just written): they measure CPU cost, not the disk.

The text is English-like prose made without downloads: an order-1 word Markov chain over the
docstrings of a fixed list of stdlib modules (plus /usr/share/common-licenses/* when present),
driven by a seeded ``random.Random``, so the data is deterministic for a given Python and its
zstd ratio is close to that of the source text (not trivially repetitive).

Each repeat runs every variant once (writes, then reads, in an order rotated per repeat so noise
hits all variants alike); the table shows the best (minimum) time of ``--repeat`` runs. Writes are
also timed in CPU seconds of the whole process (``time.process_time``: the compression threads
included), so a row that is faster only by using a second core says so.

Targets: ours' write time at most 1.0x the orjson + zstandard streaming peer's (issue 32; per-repeat
ratios printed), and within 1.2x of raw zstd for writes and reads (the first record I/O issue).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib
import inspect
import io
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import zstandard

from ipt_hpc.records import DEFAULT_FRAME_BYTES, DEFAULT_SYNC_S, RecordWriter, default_threads, read_records

LEVEL = 3
CHUNK = 1 << 20
MB = 1e6
TARGET = 1.2  # ours within this of raw zstd (write and read)
PEER_TARGET = 1.0  # ours' write time within this of the orjson + zstandard peer's
PEER = "orjson+zstd"

_DOC_MODULE_NAMES = """
abc argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures configparser contextlib
copy csv dataclasses datetime decimal difflib dis email enum fractions ftplib functools getopt gettext glob gzip
hashlib heapq hmac html http.client http.cookies http.server imaplib inspect io ipaddress itertools json logging
lzma mailbox math mimetypes multiprocessing numbers operator optparse os pathlib pickle pkgutil platform plistlib
poplib pprint queue random re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3
ssl statistics string struct subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types
typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile
zoneinfo
"""
DOC_MODULES = _DOC_MODULE_NAMES.split()

TLDS = ["com", "org", "net", "io", "co.uk", "de", "info", "edu"]


# -- data ------------------------------------------------------------------------------------
def source_text() -> str:
    """English-ish prose present on every machine: stdlib docstrings plus the common licenses."""
    seen: set[str] = set()
    docs: list[str] = []
    for name in DOC_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional module missing here only shrinks the corpus
            continue
        objs: list[Any] = [module]
        for _, obj in inspect.getmembers(module):
            objs.append(obj)
            if inspect.isclass(obj):
                objs.extend(member for _, member in inspect.getmembers(obj))
        for obj in objs:
            try:
                doc = inspect.getdoc(obj)
            except Exception:  # noqa: BLE001
                continue
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    for lic in sorted(glob.glob("/usr/share/common-licenses/*")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            docs.append(Path(lic).read_text(encoding="utf-8"))
    return "\n\n".join(docs)


def make_records(
    target_bytes: int, seed: int, doc_bytes: tuple[int, int] = (1000, 3000)
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Web-document-shaped records totalling about ``target_bytes`` of JSONL."""
    words = source_text().split()
    successors: dict[str, list[str]] = {}
    for a, b in itertools.pairwise(words):
        successors.setdefault(a, []).append(b)
    rng = random.Random(seed)
    rand = rng.random
    url_words = [w for w in dict.fromkeys(w.strip(".,:;()[]{}'\"`*").lower() for w in words) if w.isalpha()]
    records: list[dict[str, Any]] = []
    total = 0
    part = 0
    while total < target_bytes:
        want = rng.randint(*doc_bytes)
        word = words[int(rand() * len(words))]
        out = [word]
        size = len(word)
        while size < want:
            nxt = successors.get(word) or words
            word = nxt[int(rand() * len(nxt))]
            out.append(word)
            size += len(word) + 1
        if rand() < 0.001:
            part += 1
        host = f"www.{rng.choice(url_words)}-{rng.choice(url_words)}.{rng.choice(TLDS)}"
        path = "/".join(rng.choices(url_words, k=rng.randint(1, 4)))
        record = {
            "id": f"data/part-{part:04d}.jsonl:{len(records)}",
            "text": " ".join(out),
            "meta": {"url": f"https://{host}/{path}"},
        }
        records.append(record)
        total += len(orjson.dumps(record)) + 1
    info = {"corpus_words": len(words), "vocabulary": len(successors)}
    return records, info


# -- variants --------------------------------------------------------------------------------
@dataclass
class Ctx:
    records: list[dict[str, Any]]
    payload: bytes
    flush_every: int
    baseline_fsync: bool


def _durable(fh: Any, ctx: Ctx) -> None:
    fh.flush()
    if ctx.baseline_fsync:
        os.fsync(fh.fileno())


def _ours_writer(flush: bool, **options: Any) -> Callable[[Path, Ctx], None]:
    def write(path: Path, ctx: Ctx) -> None:
        writer = RecordWriter(path, **options)
        put = writer.write
        every = ctx.flush_every if flush else 0
        for i, rec in enumerate(ctx.records, 1):
            put(rec)
            if every and i % every == 0:
                writer.flush()
        writer.close()

    return write


def read_ours(path: Path, ctx: Ctx) -> int:
    n = 0
    for _ in read_records(path):
        n += 1
    return n


def write_json(path: Path, ctx: Ctx) -> None:
    dumps = json.dumps
    with open(path, "wb") as fh:
        with zstandard.ZstdCompressor(level=LEVEL).stream_writer(fh, closefd=False) as zw:
            for rec in ctx.records:
                zw.write((dumps(rec) + "\n").encode())
        _durable(fh, ctx)


def _read_text_lines(path: Path, loads: Callable[[str], Any]) -> int:
    """The streaming peers' reader: TextIOWrapper line iteration over a zstd stream, one loads per line."""
    n = 0
    with open(path, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=False)
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            loads(line)
            n += 1
    return n


def read_json(path: Path, ctx: Ctx) -> int:
    return _read_text_lines(path, json.loads)


def write_orjson(path: Path, ctx: Ctx) -> None:
    dumps = orjson.dumps
    opt = orjson.OPT_APPEND_NEWLINE
    with open(path, "wb") as fh:
        with zstandard.ZstdCompressor(level=LEVEL).stream_writer(fh, closefd=False) as zw:
            for rec in ctx.records:
                zw.write(dumps(rec, option=opt))
        _durable(fh, ctx)


def read_orjson(path: Path, ctx: Ctx) -> int:
    return _read_text_lines(path, orjson.loads)


def write_raw_oneshot(path: Path, ctx: Ctx) -> None:
    with open(path, "wb") as fh:
        fh.write(zstandard.ZstdCompressor(level=LEVEL).compress(ctx.payload))
        _durable(fh, ctx)


def read_raw_oneshot(path: Path, ctx: Ctx) -> int:
    with open(path, "rb") as fh:
        return len(zstandard.ZstdDecompressor().decompress(fh.read()))


def write_raw_stream(path: Path, ctx: Ctx) -> None:
    view = memoryview(ctx.payload)
    with open(path, "wb") as fh:
        with zstandard.ZstdCompressor(level=LEVEL).stream_writer(fh, closefd=False) as zw:
            for start in range(0, len(view), CHUNK):
                zw.write(view[start : start + CHUNK])
        _durable(fh, ctx)


def read_raw_stream(path: Path, ctx: Ctx) -> int:
    n = 0
    with open(path, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=False)
        while data := reader.read(CHUNK):
            n += len(data)
    return n


@dataclass
class Variant:
    name: str
    write: Callable[[Path, Ctx], None]
    read: Callable[[Path, Ctx], int]
    raw: bool = False  # a reference ("limit") row: read returns bytes, not records
    write_s: list[float] = field(default_factory=list)
    write_cpu: list[float] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)
    size: int = 0

    def path(self, root: Path) -> Path:
        return root / (self.name.replace(" ", "_").replace("+", "_").replace(",", "").replace("=", "") + ".jsonl.zst")


def variants(breakdown: bool, flush_every: int) -> list[Variant]:
    out = [Variant(f"ours (flush/{flush_every})", _ours_writer(True), read_ours)]
    if breakdown:
        out += [
            Variant(f"ours (flush/{flush_every}, threads=0)", _ours_writer(True, threads=0), read_ours),
            Variant(f"ours (flush/{flush_every}, sync_s=0)", _ours_writer(True, sync_s=0), read_ours),
            Variant("ours (close only)", _ours_writer(False), read_ours),
        ]
    out += [
        Variant("json+zstd", write_json, read_json),
        Variant("orjson+zstd", write_orjson, read_orjson),
        Variant("raw zstd one-shot", write_raw_oneshot, read_raw_oneshot, raw=True),
        Variant("raw zstd stream", write_raw_stream, read_raw_stream, raw=True),
    ]
    return out


# -- running ---------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of the whole process, result)."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - cpu, result


def verify(v: Variant, path: Path, ctx: Ctx) -> None:
    if v.raw:
        with open(path, "rb") as fh:
            data = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
        ok = data == ctx.payload
    elif v.read is read_ours:
        ok = list(read_records(path)) == ctx.records
    else:
        with open(path, "rb") as fh:
            reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
            lines = io.TextIOWrapper(reader, encoding="utf-8", newline="\n").read().split("\n")[:-1]
        ok = len(lines) == len(ctx.records) and all(json.loads(a) == b for a, b in zip(lines, ctx.records, strict=True))
    if not ok:
        raise SystemExit(f"FAILED: {v.name} did not read back the records it wrote")


def run(vs: list[Variant], ctx: Ctx, root: Path, repeat: int) -> None:
    sys.stdout.flush()
    for rep in range(repeat):
        order = vs[rep % len(vs) :] + vs[: rep % len(vs)]
        for v in order:
            v.path(root).unlink(missing_ok=True)
            gc.collect()
        for v in order:
            path = v.path(root)
            seconds, cpu, _ = timed(lambda v=v, path=path: v.write(path, ctx))
            v.write_s.append(seconds)
            v.write_cpu.append(cpu)
            v.size = path.stat().st_size
        for v in order:
            path = v.path(root)
            seconds, _, n = timed(lambda v=v, path=path: v.read(path, ctx))
            v.read_s.append(seconds)
            expect = len(ctx.payload) if v.raw else len(ctx.records)
            if n != expect:
                raise SystemExit(f"FAILED: {v.name} read {n}, expected {expect}")
            if rep == 0:
                verify(v, path, ctx)
        print(f"  repeat {rep + 1}/{repeat} done", file=sys.stderr, flush=True)
    for v in vs:
        v.path(root).unlink(missing_ok=True)


def report(vs: list[Variant], ctx: Ctx, args: argparse.Namespace) -> None:
    raw_mb = len(ctx.payload) / MB
    ref_w = min(min(v.write_s) for v in vs if v.raw)
    ref_r = min(min(v.read_s) for v in vs if v.raw)
    peer = next(v for v in vs if v.name == PEER)
    peer_w, peer_cpu = min(peer.write_s), min(peer.write_cpu)
    headers = [
        "variant",
        "write MB/s",
        "write / raw",
        "write / peer",
        "write CPU / peer",
        "read MB/s",
        "read / raw",
        "compressed MB",
        "ratio",
    ]
    rows = []
    for v in vs:
        w, r = min(v.write_s), min(v.read_s)
        rows.append(
            [
                v.name,
                f"{raw_mb / w:,.0f}",
                f"{w / ref_w:.2f}x",
                f"{w / peer_w:.2f}x",
                f"{min(v.write_cpu) / peer_cpu:.2f}x",
                f"{raw_mb / r:,.0f}",
                f"{r / ref_r:.2f}x",
                f"{v.size / MB:,.1f}",
                f"{len(ctx.payload) / v.size:.2f}",
            ]
        )
    title = f"record I/O, {raw_mb:,.1f} MB JSONL, {len(ctx.records):,} records, best of {args.repeat}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
            return "  ".join(padded)

        print(title)
        print(line(headers))
        for row in rows:
            print(line(row))
    else:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(shutil.get_terminal_size().columns, 150)).print(table)
    print("raw-zstd reference = the faster raw row: " + f"write {ref_w * 1e3:.0f} ms, read {ref_r * 1e3:.0f} ms")
    print(f"peer = {PEER}: write {peer_w * 1e3:.0f} ms, {peer_cpu * 1e3:.0f} ms CPU")
    print("all times (s), write / write CPU / read:")
    for v in vs:
        ws = " ".join(f"{s:.3f}" for s in v.write_s)
        cs = " ".join(f"{s:.3f}" for s in v.write_cpu)
        rs = " ".join(f"{s:.3f}" for s in v.read_s)
        print(f"  {v.name:<34} {ws}  /  {cs}  /  {rs}")
    ours = vs[0]
    per_repeat = [a / b for a, b in zip(ours.write_s, peer.write_s, strict=True)]
    best = min(ours.write_s) / peer_w
    verdict = "MET" if best <= PEER_TARGET else "MISSED"
    print(
        f"target (ours' write within {PEER_TARGET}x of {PEER}): {verdict} ({best:.2f}x best of {args.repeat}; "
        f"per repeat {', '.join(f'{x:.2f}' for x in per_repeat)}; CPU {min(ours.write_cpu) / peer_cpu:.2f}x)"
    )
    w, r = min(ours.write_s) / ref_w, min(ours.read_s) / ref_r
    verdict = "MET" if w <= TARGET and r <= TARGET else "MISSED"
    print(f"target (ours within {TARGET}x of raw zstd, write and read): {verdict} (write {w:.2f}x, read {r:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="uncompressed JSONL to generate, MB (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is shown (default 3)")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    parser.add_argument("--flush-every", type=int, default=1000, help="records between ours' flush() (default 1000)")
    parser.add_argument("--seed", type=int, default=20240607, help="data seed")
    parser.add_argument("--no-baseline-fsync", dest="baseline_fsync", action="store_false", help="baselines skip fsync")
    parser.add_argument("--doc-bytes", default="1000-3000", help="text bytes per record, MIN-MAX (default 1000-3000)")
    parser.add_argument("--breakdown", action="store_true", help="add ours without fsync and ours without flushes")
    args = parser.parse_args(argv)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}, "
        f"backend {zstandard.backend}), orjson {orjson.__version__}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    )
    t0 = time.perf_counter()
    lo, _, hi = args.doc_bytes.partition("-")
    records, info = make_records(int(args.mb * MB), args.seed, (int(lo), int(hi or lo)))
    payload = b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)
    text_bytes = sum(len(r["text"]) for r in records)
    print(
        f"data: {len(records):,} records, {len(payload) / MB:,.1f} MB JSONL "
        f"(text {text_bytes / len(records):,.0f} B/record avg), Markov text from {info['corpus_words']:,} words, "
        f"seed {args.seed}, generated in {time.perf_counter() - t0:.1f}s"
    )
    ctx = Ctx(records, payload, args.flush_every, args.baseline_fsync)
    root = Path(tempfile.mkdtemp(prefix="bench_records_", dir=args.dir))
    print(
        f"files in {root}; level {LEVEL}; ours: frame_bytes {DEFAULT_FRAME_BYTES:,}, fsync=True, "
        f"sync_s {DEFAULT_SYNC_S:g}, threads {default_threads()} (CPUs usable: {len(os.sched_getaffinity(0))}, "
        f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"flush() every {args.flush_every} records; baselines fsync at end: {args.baseline_fsync}"
    )
    vs = variants(args.breakdown, args.flush_every)
    try:
        run(vs, ctx, root, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(vs, ctx, args)


if __name__ == "__main__":
    main()
