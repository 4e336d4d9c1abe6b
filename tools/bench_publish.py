"""Benchmark ``publish`` against reading the same zstd shards alone, side by side in one run.

Usage (with the project's venv python)::

    python tools/bench_publish.py --demo runs/demo --gb 1 --dir /tmp/bench-publish

For each run (the demo run given with ``--demo``, and a synthetic run of ``--gb`` GB of uncompressed
augmented-like JSONL that this script writes first, with :class:`ipt_hpc.records.RecordWriter`, outside
the timing) and each part:

* ``read``: every record of the part's shards through :func:`ipt_hpc.records.read_records` (the records
  reader every stage uses), in this process;
* ``publish``: ``run_stage(publish.STAGE, ...)`` on the debug executor (in this process; pyarrow's JSON
  reader and the Parquet writer's thread may use a second core, the read uses one), markers, fsync and
  manifest included, into a fresh folder each repeat.

MB/s is the uncompressed JSONL bytes of the input shards (as the manifests count them) divided by the
time, so the ratio is a time ratio; ms/shard is the publish time over the shards (on the demo, whose
shards hold ~0.1 MB, that is the fixed cost of a shard). The table shows the best of ``--repeat`` runs,
each a read then a publish, with the per-repeat ratios and whether every repeat wrote the same bytes
below it. Reads come from the page cache (the shards were just written or read): they measure CPU
cost, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import time
from pathlib import Path

import zstandard

from ipt_hpc.config import load_config
from ipt_hpc.execution import build, launch, run_stage, shard_name
from ipt_hpc.layout import RunLayout
from ipt_hpc.records import RecordWriter, read_records
from ipt_hpc.stages import publish

TARGET = 0.8  # issue 32: publish at least this share of the read-only pass's speed on 1 GB


def make_run(root: Path, gb: float, shards: int, seed: int = 0) -> tuple[Path, int]:
    """A run whose ``augmented`` folder holds ``gb`` GB of templify-shaped records (no stage markers)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(20_000)]
    pool = " ".join(rng.choices(vocab, k=3_000_000))  # ~18 MB: beyond zstd's window
    target, per_shard = int(gb * 1e9), int(gb * 1e9) // shards
    run, written = root / f"synthetic-{gb:g}gb", 0
    shutil.rmtree(run, ignore_errors=True)  # a run left by an earlier call: made again
    folder = run / "augmented"
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for k in range(shards):
        size = 0
        with RecordWriter(folder / shard_name(k, shards)) as w:
            while size < per_shard and written < target:
                length = rng.randint(500, 8000)
                start = rng.randrange(0, len(pool) - length)
                text = pool[start : start + length]
                rec = {"id": f"doc-{n}", "group": "augmented" if n % 5 else "raw", "docs": [f"doc-{n}"],
                       "pairs": n % 4, "format": "classic" if n % 5 else "raw", "text": text}  # fmt: skip
                w.write(rec)
                size += len(text) + 120
                written += len(text) + 120
                n += 1
    return run, shards


def jsonl_bytes(folder: Path, shards: int) -> int:
    """Uncompressed bytes of a folder's shards (their JSON Lines)."""
    total = 0
    for k in range(shards):
        with open(folder / shard_name(k, shards), "rb") as fh:
            reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
            while chunk := reader.read(1 << 24):
                total += len(chunk)
    return total


def time_read(folder: Path, shards: int) -> float:
    t = time.perf_counter()
    n = 0
    for k in range(shards):
        for rec in read_records(folder / shard_name(k, shards)):
            n += len(rec["text"])
    return time.perf_counter() - t


def time_publish(run: Path, out: Path, part: str, shards: int, marked: bool, compression: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    sets = {"execution.backend": "debug", "publish.out": str(out), "publish.part": part}
    cfg = load_config(None, None, {**sets, "publish.compression": compression})
    t = time.perf_counter()
    if marked:  # a real run: its stage folders say how many shards they hold
        run_stage(publish.STAGE, cfg, run)
    else:
        launch(build(publish.STAGE, cfg, run, num_shards=shards), "all", cfg.execution)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, help="a run folder with raw/, synth/ and augmented/ (e.g. runs/demo)")
    ap.add_argument("--gb", type=float, default=1.0, help="uncompressed GB of the synthetic run (0: none)")
    ap.add_argument("--shards", type=int, default=8, help="shards of the synthetic run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compression", default="zstd", choices=["zstd", "snappy", "none"], help="publish.compression")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-publish"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    cases = []  # (label, run, part, shards, marked)
    if args.demo:
        for part in publish.PARTS:
            folder = publish.input_folder(load_config(), RunLayout.of(args.demo), part)
            n = len(list(folder.glob("shard-*.jsonl.zst")))
            cases.append((f"demo {part}", args.demo, part, n, True))
    if args.gb:
        t = time.perf_counter()
        run, n = make_run(args.dir, args.gb, args.shards)
        print(f"synthetic run written in {time.perf_counter() - t:.1f} s (not timed below)", file=sys.stderr)
        cases.append((f"synthetic {args.gb:g} GB augmented", run, "augmented", n, False))
    rows, notes = [], []
    for label, run, part, n, marked in cases:
        folder = publish.input_folder(load_config(), RunLayout.of(run), part)
        mb = jsonl_bytes(folder, n) / 1e6
        out = args.dir / "out"
        reads, pubs, digests = [], [], set()
        for _ in range(args.repeat):  # side by side: a read, then a publish, each repeat
            reads.append(time_read(folder, n))
            pubs.append(time_publish(run, out, part, n, marked, args.compression))
            digests.add(
                tuple(hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((out / part).glob("*.parquet")))
            )
        read, pub = min(reads), min(pubs)
        parquet = sum(f.stat().st_size for f in (out / part).glob("*.parquet")) / 1e6
        rows.append((label, n, mb, parquet, mb / read, mb / pub, read / pub, pub / n * 1e3))
        per = ", ".join(f"{r / p:.2f}" for r, p in zip(reads, pubs, strict=True))
        notes.append(f"{label}: publish/read per repeat {per}; same Parquet bytes in every repeat: "
                     f"{'yes' if len(digests) == 1 else 'NO'}")  # fmt: skip
    head = ("run / part", "shards", "JSONL MB", "Parquet MB", "read MB/s", "publish MB/s", "publish/read", "ms/shard")
    print(f"publish.compression: {args.compression}")
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for label, n, mb, parquet, r, p, ratio, ms in rows:
        print(f"| {label} | {n} | {mb:,.1f} | {parquet:,.1f} | {r:,.1f} | {p:,.1f} | {ratio:.2f} | {ms:.1f} |")
    print("\n".join(notes))
    if args.gb:
        ratio = rows[-1][6]
        verdict = "MET" if ratio >= TARGET else "MISSED"
        what = f"publish >= {TARGET}x the read on the synthetic run, best of {args.repeat}"
        print(f"target ({what}): {verdict} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
