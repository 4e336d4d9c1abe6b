"""The ``tokenize`` stage: zstd JSONL shards -> Megatron indexed datasets, one document per record.

Per shard, ``workers`` single-threaded tokenizer processes (``encode_batch_fast``, the ``tokenizers``
Rust core) each take a byte range of whole zstd frames of the shard (the main process only walks the
frame headers), decompress, parse, apply the record policies and tokenize it themselves: no text
crosses a process boundary and reading runs in parallel. Ids come back in order and are appended to
``tokens/<group>/shard-NNNNN.bin``; the ``.idx`` is written last. A file whose frames do not end at
record boundaries (not written by :class:`~ipt_hpc.records.RecordWriter`) or are too large is read by
the main process instead, which hands batches of texts to the same workers: the same bytes either way.
A shard is redone whole if interrupted (never half-appended). ``merge`` then concatenates the shards of
a group into ``tokens/<group>.{bin,idx}`` without re-tokenizing.

Special tokens are added here, not by the tokenizer (``add_special_tokens=False``): BOS before each
document when the model family's tokenizer adds one itself (``prepend_bos: auto``; Llama/Mistral do)
and EOD (the tokenizer's EOS) after each, as Megatron GPT training expects.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..atomic import write_json_atomic
from ..config import Config
from ..errors import IptError, RecordError
from ..execution import ShardContext, StageRun, StageState, shard_name
from ..execution.shards import manifest_of
from ..execution.stage import Stage
from ..indexed import IndexedWriter, dtype_for_vocab, merge
from ..layout import RunLayout
from ..records import PARTIAL_SUFFIX, RecordWriter, iter_lines, zstd_frames
from .tokenize_worker import (  # a light module: spawned workers import little
    LineProblem,
    _encode,
    _encode_range,
    _init_worker,
    new_stats,
    select_texts,
)

SHARD_SUFFIX = ".jsonl.zst"


class TokenizeJob(BaseModel):
    """What a tokenize task needs (resolved from the config and the tokenizer; JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer_dir: str
    tokenizer_sha256: str
    text_field: str
    bos_id: int | None
    eod_id: int | None
    dtype: Literal["uint16", "int32"]
    empty_text: Literal["error", "skip", "keep"]
    on_bad_record: Literal["error", "quarantine"]
    workers: int
    batch_docs: int
    record_group: str | None


# -- tokenizer ----------------------------------------------------------------------------------
def prepare_tokenizer(spec: str, dest: Path) -> tuple[Any, str]:
    """Load a fast tokenizer (path or hub name) and keep a copy in the run: ``(tokenizer, sha256)``."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise IptError("tokenize needs transformers: pip install 'ipt_hpc[train]'") from exc
    try:
        tok = AutoTokenizer.from_pretrained(spec, use_fast=True)
    except (OSError, ValueError) as exc:
        raise IptError(f"cannot load tokenizer {spec!r}: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise IptError(f"tokenizer {spec!r} has no fast (Rust) version; tokenize needs one")
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(dest))
    sha = hashlib.sha256((dest / "tokenizer.json").read_bytes()).hexdigest()
    return tok, sha


def special_ids(tok: Any, prepend_bos: str, append_eod: bool) -> tuple[int | None, int | None]:
    """BOS id (or None) and EOD id (or None) per the config and the tokenizer's own behaviour."""
    bos = tok.bos_token_id
    if prepend_bos == "auto":
        ids = tok("a")["input_ids"]
        prepend = bos is not None and bool(ids) and ids[0] == bos
    else:
        prepend = prepend_bos == "always"
        if prepend and bos is None:
            raise IptError("tokenize.prepend_bos=always, but the tokenizer has no BOS token")
    eod = tok.eos_token_id if append_eod else None
    if append_eod and eod is None:
        raise IptError("tokenize.append_eod=true, but the tokenizer has no EOS token to use as EOD")
    return (bos if prepend else None), eod


# -- workers ------------------------------------------------------------------------------------
_POOLS: dict[tuple[Any, ...], Any] = {}


@atexit.register
def _close_pools() -> None:
    _AHEAD.clear()
    for pool in _POOLS.values():
        pool.terminate()
    _POOLS.clear()


def _pool(workers: int, preload: str | None = None) -> Any:
    """``workers`` tokenizer processes, kept for the next shards of the same task. They load the job's
    tokenizer on their first task (:func:`~ipt_hpc.stages.tokenize_worker._setup`), or at start the
    ``tokenizer.json`` given as ``preload`` if it turns out to be the same file."""
    if workers not in _POOLS:
        _close_pools()
        ctx = multiprocessing.get_context("spawn")
        _POOLS[workers] = ctx.Pool(workers, initializer=_init_worker, initargs=(preload,))
    return _POOLS[workers]


def _spec(job: TokenizeJob) -> tuple[str, str, int | None, int | None, str]:
    return (str(Path(job.tokenizer_dir) / "tokenizer.json"), job.tokenizer_sha256, job.bos_id, job.eod_id, job.dtype)


# -- one shard ----------------------------------------------------------------------------------
TASK_BYTES = 2 << 20  # decompressed bytes of whole frames per fast-path task (RecordWriter frames are 1 MiB)
MAX_TASK_BYTES = 16 << 20  # a frame larger than this (or of unknown size) is read by the general path
# The last ranges of a shard are cut into parts (each worker decompresses the range and takes its part of
# the lines), so that no worker idles long while the others finish the shard.
TAIL_RANGES_PER_WORKER = 2
TAIL_PARTS_PER_WORKER = 2


def _policy(job: TokenizeJob) -> tuple[str, str | None, str, str]:
    return (job.text_field, job.record_group, job.empty_text, job.on_bad_record)


def _batches(job: TokenizeJob, path: Path, stats: dict[str, int], quarantine: list[dict]) -> Iterator[list[str]]:
    """Texts of a shard read here, in batches, applying the empty-text and bad-record policies."""
    batch: list[str] = []
    found: list[tuple[int, str]] = []
    try:
        for text in select_texts(iter_lines(path), _policy(job), stats, found):
            if found:
                quarantine.extend(_quarantined(path, found))
                found.clear()
            batch.append(text)
            if len(batch) >= job.batch_docs:
                yield batch
                batch = []
    except LineProblem as exc:
        raise RecordError(path, exc.line, exc.reason) from None
    quarantine.extend(_quarantined(path, found))
    if batch:
        yield batch


def _quarantined(path: Path, found: list[tuple[int, str]], base: int = 0) -> Iterator[dict[str, Any]]:
    """Quarantine entries of ``(line, reason)`` pairs whose lines count from line ``base + 1`` of ``path``."""
    return ({"file": path.name, "line": base + line, "reason": why} for line, why in found)


def _append(job: TokenizeJob, ctx: ShardContext, writer: IndexedWriter, ids: bytes, lengths: bytes) -> None:
    """Append a worker's answer (concatenated ids, document lengths) to the shard's dataset."""
    writer.add(np.frombuffer(ids, dtype=job.dtype), np.frombuffer(lengths, dtype=np.int32))
    ctx.report(writer.documents, tokens=writer.tokens)


def _range_tasks(job: TokenizeJob, path: Path, split_tail: bool) -> list[tuple[int, int, int, int, bool]] | None:
    """Fast-path tasks ``(start, end, part, parts, last)`` of whole frames, or None for the general path.

    ``split_tail``: cut the last ranges into parts (for the last shard of a task: no next shard's work
    then fills the workers while the slowest finishes)."""
    if path.name.endswith(PARTIAL_SUFFIX):
        return None  # the general path says why it refuses
    try:
        frames = zstd_frames(path)
    except RecordError as exc:
        raise RecordError(path, None, f"corrupt or truncated zstd data ({exc.reason})") from exc
    except FileNotFoundError as exc:
        raise IptError(f"{path}: no such record file") from exc
    if any(size is None or size > MAX_TASK_BYTES for _, _, size in frames):
        return None
    ranges: list[tuple[int, int]] = []
    start = size_sum = 0
    for k, (_, end, size) in enumerate(frames):
        size_sum += size or 0
        if size_sum >= TASK_BYTES or k == len(frames) - 1:
            ranges.append((start, end))
            start, size_sum = end, 0
    tail = TAIL_RANGES_PER_WORKER * job.workers if job.workers > 1 and split_tail else 0
    tasks: list[tuple[int, int, int, int, bool]] = []
    for k, (a, b) in enumerate(ranges):
        last = k == len(ranges) - 1
        parts = TAIL_PARTS_PER_WORKER * job.workers if k >= len(ranges) - tail else 1
        tasks.extend((a, b, part, parts, last) for part in range(parts))
    return tasks


class _Feed:
    """The fast-path tasks of one shard, sent to the pool in order; results are taken in the same order."""

    def __init__(self, job: TokenizeJob, path: Path, tasks: list[tuple[int, int, int, int, bool]], pool: Any) -> None:
        self.path, self.pool = path, pool
        self.key = (_spec(job), _policy(job), _file_id(path))
        self.pending = deque(tasks)
        self.in_flight: deque[Any] = deque()

    def send(self) -> bool:
        """Send the next task to the pool; False when all are sent."""
        if not self.pending:
            return False
        spec, policy, _ = self.key
        task = self.pending.popleft()
        self.in_flight.append(self.pool.apply_async(_encode_range, (spec, str(self.path), *task, policy)))
        return True

    def wait(self) -> None:
        for res in self.in_flight:
            res.wait()


def _file_id(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# The next shard's feed, started while this shard's last tasks run, so that the workers do not wait at
# shard boundaries (the drain, closing and marking the shard done). At most one; a hint only: the next
# shard's call takes it if it is for the same file, tokenizer and policies, else it is dropped.
_AHEAD: dict[str, _Feed] = {}


def _take_ahead(job: TokenizeJob, path: Path, pool: Any) -> _Feed | None:
    feed = _AHEAD.pop(str(path), None)
    _AHEAD.clear()
    try:
        same = feed is not None and feed.pool is pool and feed.key == (_spec(job), _policy(job), _file_id(path))
    except OSError:
        same = False
    return feed if same else None


def _start_ahead(job: TokenizeJob, ctx: ShardContext, pool: Any) -> _Feed | None:
    for path in ctx.next_inputs[:1]:
        try:
            tasks = _range_tasks(job, path, split_tail=len(ctx.next_inputs) < 2)
        except (IptError, OSError):
            return None  # that shard's own call reports it
        if tasks is not None:
            _AHEAD.clear()
            _AHEAD[str(path)] = feed = _Feed(job, path, tasks, pool)
            return feed
    return None


def _tokenize_ranges(
    job: TokenizeJob, ctx: ShardContext, writer: IndexedWriter, stats: dict[str, int], quarantine: list[dict]
) -> bool:
    """The fast path: workers read their own frames; ids come back in order. False if the file does not
    fit it (frames not ending at record boundaries, huge frames): nothing useful was written then.

    Once all of this shard's tasks are sent, the next shard of the task (if any) is started in their
    place, so that ``2 * workers`` tasks stay in flight across the boundary."""
    pool = _pool(job.workers)
    feed = _take_ahead(job, ctx.input_path, pool)
    if feed is None:
        tasks = _range_tasks(job, ctx.input_path, split_tail=not ctx.next_inputs)
        if tasks is None:
            return False
        feed = _Feed(job, ctx.input_path, tasks, pool)
    depth = 2 * job.workers
    ahead: _Feed | None = None
    base = 0  # lines before the oldest task in flight
    try:
        while feed.pending or feed.in_flight:
            while len(feed.in_flight) < depth and feed.send():
                pass
            if not feed.pending:
                ahead = ahead or _start_ahead(job, ctx, pool)
                while ahead and len(feed.in_flight) + len(ahead.in_flight) < depth and ahead.send():
                    pass
            base = _write_result(feed.in_flight.popleft().get(), base, job, ctx, writer, stats, quarantine)
    except _NotAligned:
        feed.wait()  # let the workers finish what they hold before the general path sends more
        return False
    return True


class _NotAligned(Exception):
    pass


def _write_result(
    out: dict[str, Any],
    base: int,
    job: TokenizeJob,
    ctx: ShardContext,
    writer: IndexedWriter,
    stats: dict[str, int],
    quarantine: list[dict],
) -> int:
    if not out["aligned"]:
        raise _NotAligned
    if out["error"] is not None:
        line, reason = out["error"]
        raise RecordError(ctx.input_path, base + line, reason)
    for key, n in out["stats"].items():
        stats[key] += n
    quarantine.extend(_quarantined(ctx.input_path, out["quarantine"], base))
    if out["lengths"]:
        _append(job, ctx, writer, out["ids"], out["lengths"])
    return base + out["lines"]


def _tokenize_read_here(
    job: TokenizeJob, ctx: ShardContext, writer: IndexedWriter, stats: dict[str, int], quarantine: list[dict]
) -> None:
    """The general path: this process reads and parses, workers tokenize batches of texts."""
    pool, spec = _pool(job.workers), _spec(job)
    in_flight: deque[Any] = deque()  # at most 2 batches per worker: bounded memory, workers never idle

    for batch in _batches(job, ctx.input_path, stats, quarantine):
        in_flight.append(pool.apply_async(_encode, (spec, batch)))
        if len(in_flight) >= 2 * job.workers:
            _append(job, ctx, writer, *in_flight.popleft().get())
    while in_flight:
        _append(job, ctx, writer, *in_flight.popleft().get())


def tokenize_shard(job: TokenizeJob, ctx: ShardContext) -> dict[str, Any]:
    """Tokenize one shard into ``ctx.output_path`` (a task of the execution layer)."""
    prefix = ctx.output_path.parent / ctx.output_path.name.removesuffix(".idx")
    started = time.time()
    if job.workers not in _POOLS:  # the task's first shard: its workers start and load the tokenizer
        _pool(job.workers).starmap(_encode, [(_spec(job), [])] * job.workers, chunksize=1)
    load_s = time.time() - started  # (timed apart: the plan separates a task's start from its per-document work)
    writer = IndexedWriter(prefix, np.dtype(job.dtype))
    try:
        stats = new_stats()
        quarantine: list[dict] = []
        if not _tokenize_ranges(job, ctx, writer, stats, quarantine):
            writer.discard()
            writer = IndexedWriter(prefix, np.dtype(job.dtype))
            stats = new_stats()
            quarantine = []
            _tokenize_read_here(job, ctx, writer, stats, quarantine)
        if quarantine:
            qpath = ctx.output_path.parent / "quarantine" / f"{prefix.name}.jsonl.zst"
            qpath.unlink(missing_ok=True)
            with RecordWriter(qpath) as q:
                q.write_many(quarantine)
        out = writer.close()
    except BaseException:
        writer.discard()
        raise
    seconds = time.time() - started
    return {
        "records": out["documents"],
        "tokens": out["tokens"],
        "bin_bytes": out["bin_bytes"],
        "input_bytes": ctx.input_path.stat().st_size,
        "tokens_per_s": round(out["tokens"] / seconds, 1) if seconds > 0 else None,
        "load_s": round(load_s, 3),
        **stats,
    }


# -- coordinator ----------------------------------------------------------------------------------
def _workers(cfg: Config) -> int:
    return cfg.tokenize.workers or cfg.execution.slurm.cpus_per_task or os.cpu_count() or 1


def group_dir(cfg: Config, layout: RunLayout) -> Path:
    """The token group's stage folder ``tokens/<group>`` (its merged dataset: ``tokens/<group>.bin/.idx``)."""
    t = cfg.tokenize
    return layout.token_group(t.group or t.record_group or t.input_stage)


def tokenize_job(cfg: Config, layout: RunLayout) -> TokenizeJob:
    """The stage's job: loads the tokenizer and keeps a copy of it in the token group's folder."""
    t = cfg.tokenize
    if not t.tokenizer:
        raise IptError("tokenize: no tokenizer given (--tokenizer PATH_OR_NAME or tokenize.tokenizer)")
    if cfg.execution.backend == "debug":  # shards run in this process: start the workers while the tokenizer loads
        source = Path(t.tokenizer) / "tokenizer.json"
        _pool(_workers(cfg), str(source) if source.is_file() else None)
    tok_dir = group_dir(cfg, layout) / "tokenizer"
    tok, sha = prepare_tokenizer(t.tokenizer, tok_dir)
    bos, eod = special_ids(tok, t.prepend_bos, t.append_eod)
    vocab = len(tok)
    dtype = str(dtype_for_vocab(vocab)) if t.dtype == "auto" else t.dtype
    if dtype == "uint16" and vocab >= 65536:
        raise IptError(f"tokenize.dtype=uint16 cannot hold a vocabulary of {vocab} tokens")
    return TokenizeJob(
        tokenizer_dir=str(tok_dir.resolve()),
        tokenizer_sha256=sha,
        text_field=t.text_field,
        bos_id=bos,
        eod_id=eod,
        dtype=dtype,  # type: ignore[arg-type]
        empty_text=t.empty_text,
        on_bad_record=cfg.records.on_bad_record,
        workers=_workers(cfg),
        batch_docs=t.batch_docs,
        record_group=t.record_group,
    )


def merge_group(run: StageRun) -> dict[str, Any]:
    """Merge a finished group's shards into ``tokens/<group>.{bin,idx}`` and write its manifest."""
    state = StageState(run.out_dir)
    names = [shard_name(k, run.num_shards) for k in range(run.num_shards)]
    missing = [n for n in names if not state.is_done(n)]
    if missing:
        raise IptError(f"{run.out_dir}: {len(missing)} shards not tokenized yet (e.g. {missing[0]}); see status")
    prefixes = [run.out_dir / n[: -len(SHARD_SUFFIX)] for n in names]
    out_prefix = run.out_dir.parent / run.out_dir.name
    stats = merge(prefixes, out_prefix)
    manifest = manifest_of(run)  # config, hash, every shard's stats and their totals
    totals = manifest["totals"]
    manifest |= {
        "group": run.out_dir.name,
        "dataset": str(out_prefix),
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "mean_length": round(stats["tokens"] / stats["documents"], 2) if stats["documents"] else 0.0,
        **{key: totals.get(key, 0) for key in ("bad", "skipped_empty", "other_group")},
    }
    write_json_atomic(run.out_dir / "manifest.json", manifest)
    return manifest


STAGE = Stage(
    name="tokenize",
    upstream="its input stage (tokenize.input_stage)",
    input=lambda cfg, layout: layout.stage(cfg.tokenize.input_stage),
    output=group_dir,
    shard_fn=tokenize_shard,
    job=tokenize_job,
    finalize=merge_group,
    out_suffix=".idx",
)
