"""Per-shard stages: one output shard per input shard, resumable at record granularity.

A stage provides a pure function ``shard_fn(stage_config, ctx) -> stats``; it reads
``ctx.input_path``, writes through ``ctx.open_output()`` (a resuming :class:`RecordWriter`) and
skips the ``writer.records`` input records already durable. Everything else lives here:
completion markers, attempt log, failure records, the preemption hook, selection and submission.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..config import config_hash
from ..errors import IptError
from ..records import DEFAULT_SYNC_S, RecordWriter
from .state import StageState, now, shard_name

REPORT_EVERY_S = 1.0


WRITER_OPTIONS = ("level", "frame_bytes", "fsync", "sync_s", "threads")


def record_options(records: Any) -> dict[str, Any]:
    """The options every stage's record writers take from ``records.*`` (a ``RecordsConfig``, or a
    :class:`StageRun`, which carries them as fields)."""
    return {name: getattr(records, name) for name in WRITER_OPTIONS}


@dataclass(frozen=True)
class StageRun:
    """Everything a shard task needs (picklable: it travels to the array tasks)."""

    stage: str
    run_dir: str
    out_folder: str
    in_folder: str
    num_shards: int
    shard_fn: Callable[[Any, ShardContext], dict[str, Any]]
    stage_config: Any
    max_attempts: int = 10  # per submission: preemptions and requeues included
    submitted_at: float = 0.0
    out_suffix: str = ".jsonl.zst"  # the file whose existence completes a shard (tokenize: ".idx")
    finalize_fn: Callable[[StageRun], dict[str, Any]] | None = None  # run once all shards are done
    frame_bytes: int = 1 << 20
    level: int = 3
    fsync: bool = True
    sync_s: float = DEFAULT_SYNC_S  # these two do not change the bytes (not in config_hash)
    threads: int | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / self.out_folder

    @property
    def in_dir(self) -> Path:
        return Path(self.run_dir) / self.in_folder

    def config_data(self) -> Any:
        cfg = self.stage_config
        return cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg

    def config_hash(self) -> str:
        """What decides the stage's output: a stage config with ``identity()`` leaves out what cannot change it
        (e.g. the address of a server), so a stage can be resumed where only that changed."""
        cfg = self.stage_config
        data = cfg.identity() if hasattr(cfg, "identity") else self.config_data()
        return config_hash({"stage": self.stage, "config": data, "level": self.level, "frame": self.frame_bytes})

    def to_json(self) -> dict[str, Any]:
        """A JSON form (functions by import path) so that hand-written sbatch scripts can rebuild it."""
        cfg_type = type(self.stage_config)
        return {
            "stage": self.stage,
            "run_dir": str(Path(self.run_dir).resolve()),
            "out_folder": self.out_folder,
            "in_folder": self.in_folder,
            "num_shards": self.num_shards,
            "shard_fn": _path_of(self.shard_fn),
            "stage_config": self.config_data(),
            "config_class": None if cfg_type in (dict, list) else f"{cfg_type.__module__}:{cfg_type.__qualname__}",
            "max_attempts": self.max_attempts,
            "out_suffix": self.out_suffix,
            "finalize_fn": _path_of(self.finalize_fn) if self.finalize_fn else None,
            "frame_bytes": self.frame_bytes,
            "level": self.level,
            "fsync": self.fsync,
            "sync_s": self.sync_s,
            "threads": self.threads,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRun:
        config = data["stage_config"]
        if data.get("config_class"):
            config = _import(data["config_class"]).model_validate(config)
        fields = {k: v for k, v in data.items() if k not in ("shard_fn", "stage_config", "config_class", "finalize_fn")}
        finalize = _import(data["finalize_fn"]) if data.get("finalize_fn") else None
        return cls(shard_fn=_import(data["shard_fn"]), stage_config=config, finalize_fn=finalize, **fields)


def _path_of(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _import(path: str) -> Any:
    """``package.module:Name`` -> the object."""
    module, _, name = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise IptError(f"cannot import {path!r} ({exc}); is the package installed / PYTHONPATH set?") from exc
    return obj


class ShardContext:
    """What a stage function sees of the engine for one shard."""

    def __init__(self, run: StageRun, shard_id: int, state: StageState, info: dict[str, Any]) -> None:
        self.run = run
        self.shard_id = shard_id
        self.name = shard_name(shard_id, run.num_shards)
        self.attempt: int = info["attempt"]
        self.input_path = run.in_dir / self.name
        self.output_path = run.out_dir / (self.name.removesuffix(".jsonl.zst") + run.out_suffix)
        self.state = state
        self._info = info  # the running marker's fields (job, host, pid, attempt, started)
        self._writers: list[RecordWriter] = []
        self._last_report = 0.0
        self.next_inputs: list[Path] = []  # inputs of the shards this task runs next (set by the runner)

    @property
    def log_dir(self) -> Path:
        """The stage's folder of shard logs (a task's helper processes log there too)."""
        return shard_log(self.state, self.name).parent

    def open_output(self, path: Path | None = None) -> RecordWriter:
        """A writer for this shard's output that resumes after the last durable record."""
        writer = RecordWriter(path or self.output_path, resume=True, **record_options(self.run))
        self._writers.append(writer)
        if writer.records:
            self.state.log_event(self.name, "resumed", attempt=self.attempt, records=writer.records)
        return writer

    def write_all(self, records: Iterable[dict[str, Any]], flush_every: int = 1000) -> dict[str, Any]:
        """Write a stage's deterministic output: the records the output already holds durably (a resumed task)
        are skipped, the rest written, flushed every ``flush_every`` records with a progress report. Returns
        the closed writer's stats."""
        writer = self.open_output()
        skip = writer.records
        for n, rec in enumerate(records):
            if n < skip:
                continue
            writer.write(rec)
            if writer.records % flush_every == 0:
                writer.flush()
                self.report(writer.records)
        return writer.close().to_json()

    def report(self, records: int, **counters: Any) -> None:
        """Progress for ``status`` (rewrites the running marker at most once per ``REPORT_EVERY_S``)."""
        t = time.time()
        if t - self._last_report >= REPORT_EVERY_S:
            self._last_report = t
            self.state.mark_running(self.name, {**self._info, "records": records, "updated": now(), **counters})

    def make_durable(self) -> None:
        """Flush open writers unless one is in the middle of a write (signal-handler safe)."""
        for writer in self._writers:
            writer.flush_if_idle()


class ShardRunner:
    """The task function of a per-shard stage: markers around ``shard_fn`` (picklable)."""

    def __init__(self, run: StageRun) -> None:
        self.run = run
        self._ctx: ShardContext | None = None
        self._upcoming: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"run": self.run, "_ctx": None, "_upcoming": []}

    def set_upcoming(self, shard_ids: list[int]) -> None:
        """The shards this task runs after the next call (see :attr:`ShardContext.next_inputs`)."""
        self._upcoming = shard_ids

    def on_preempt(self) -> None:
        ctx = self._ctx
        if ctx is not None:
            ctx.make_durable()
            ctx.state.log_event(ctx.name, "preempted", attempt=ctx.attempt, job=_job_id())

    def __call__(self, shard_id: int) -> dict[str, Any]:
        run = self.run
        state = StageState(run.out_dir)
        name = shard_name(shard_id, run.num_shards)
        if state.is_done(name):
            return {"skipped": True, **(state.read("done", name) or {})}
        with _shard_lock(state, name):
            if state.is_done(name):  # finished by another task just before we took the lock
                return {"skipped": True, **(state.read("done", name) or {})}
            return self._run_locked(shard_id, name, state)

    def _run_locked(self, shard_id: int, name: str, state: StageState) -> dict[str, Any]:
        run = self.run
        events = state.events(name)
        attempt = sum(1 for e in events if e["event"] == "start") + 1
        this_submission = sum(1 for e in events if e["event"] == "start" and e["time"] >= run.submitted_at)
        if this_submission >= run.max_attempts:
            msg = (
                f"{name}: gave up after {run.max_attempts} attempts (execution.max_attempts);"
                f" see {state.attempts_path(name)}"
            )
            state.mark_failed(name, {"error": msg, "attempt": attempt - 1, "time": now()})
            state.log_event(name, "failed", attempt=attempt - 1, error="too many attempts")
            raise IptError(msg)
        info = {
            "job": _job_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "attempt": attempt,
            "started": now(),
        }
        state.log_event(name, "start", **info)
        state.mark_running(name, info)
        ctx = ShardContext(run, shard_id, state, info)
        names = (shard_name(k, run.num_shards) for k in self._upcoming)
        ctx.next_inputs = [run.in_dir / n for n in itertools.islice((n for n in names if not state.is_done(n)), 2)]
        self._ctx = ctx
        started = time.time()
        try:
            problem = input_problem(run, name)
            if problem:
                raise IptError(f"{run.stage} refuses to start: {problem}")
            stats = run.shard_fn(run.stage_config, ctx)
        except BaseException as exc:
            from .tasks import describe, keep_traceback

            ctx.make_durable()
            log = None
            if isinstance(exc, Exception):
                error = describe(exc)
                if not isinstance(exc, IptError):
                    log = keep_traceback(shard_log(state, name), exc, f"attempt {attempt} job {info['job']}")
            else:
                error = f"interrupted ({type(exc).__name__})"
            failure = {"error": error, "attempt": attempt, "job": info["job"], "time": now()}
            state.mark_failed(name, {**failure, "log": str(log)} if log else failure)
            state.log_event(name, "failed", attempt=attempt, error=error)
            if log is not None:
                raise IptError(f"{error} (traceback: {log})") from exc
            raise
        finally:
            self._ctx = None
        if not ctx.output_path.exists():
            raise IptError(f"{name}: stage {run.stage} returned without completing {ctx.output_path}")
        stats = {**stats, "seconds": round(time.time() - started, 3), "attempt": attempt, "finished": now()}
        state.mark_done(name, stats)
        state.log_event(name, "done", attempt=attempt, records=stats.get("records"))
        if len(state.names("done")) >= run.num_shards:
            finalize(run)
        return stats


def _summable(key: str) -> bool:
    """Counts add up over shards; rates, shares and timestamps do not."""
    return key not in ("attempt", "finished") and not key.endswith(("_per_s", "_share"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def manifest_of(run: StageRun) -> dict[str, Any]:
    """A stage's manifest: config, every shard's completion stats, and their totals.

    Numbers add up over shards (rates, shares and timestamps excepted), and so do counters: a dict of
    numbers per shard (e.g. pairs per document, drops by reason) totals key by key.
    """
    state = StageState(run.out_dir)
    shards = [state.read("done", shard_name(k, run.num_shards)) or {} for k in range(run.num_shards)]
    totals: dict[str, Any] = {}
    for stats in shards:
        for key, value in stats.items():
            if _is_number(value) and _summable(key):
                totals[key] = totals.get(key, 0) + value
            elif isinstance(value, dict) and all(_is_number(v) for v in value.values()):
                counter = totals.setdefault(key, {})
                for k, v in value.items():
                    counter[k] = counter.get(k, 0) + v
    return {
        "stage": run.stage,
        "config_hash": run.config_hash(),
        "config": run.config_data(),
        "num_shards": run.num_shards,
        "totals": totals,
        "shards": shards,
    }


def stage_manifest(run: StageRun) -> dict[str, Any]:
    """The default finalize step: write :func:`manifest_of` as the stage's ``manifest.json``."""
    manifest = manifest_of(run)
    write_json_atomic(run.out_dir / "manifest.json", manifest)
    return manifest


def finalize(run: StageRun) -> dict[str, Any] | None:
    """Once every shard is done: the stage's finalize step (default: its manifest), exactly once.

    Called by whichever task completes the last shard; a lock and the manifest's presence keep two
    tasks finishing together from doing it twice. A failure is recorded, not raised: the shards are
    done, and ``python -m ipt_hpc.launch merge``/a rerun can finish the job.
    """
    state = StageState(run.out_dir)
    if (run.out_dir / "manifest.json").exists():
        return None
    with _try_lock(state, "finalize") as locked:
        if not locked:
            return None  # another task is finalizing
        if (run.out_dir / "manifest.json").exists():
            return None
        if any(not state.is_done(shard_name(k, run.num_shards)) for k in range(run.num_shards)):
            return None
        try:
            result = (run.finalize_fn or stage_manifest)(run)
        except Exception as exc:  # noqa: BLE001 - recorded for status; shards stay done
            from .tasks import describe

            write_json_atomic(state.root / "finalize-error.json", {"error": describe(exc), "time": now()})
            return None
        (state.root / "finalize-error.json").unlink(missing_ok=True)
        return result


def shard_log(state: StageState, name: str) -> Path:
    """The file that keeps the full tracebacks of a shard's failed attempts."""
    return state.root / "logs" / "shards" / f"{name}.log"


def input_problem(run: StageRun, name: str) -> str | None:
    """Why input shard ``name`` of ``run`` is not ready (None when it is): missing, or not marked done
    by its stage (failed, or still being written). A folder that is no stage's output only needs the file."""
    if not run.in_folder:
        return None  # no input stage (shard reads the corpus)
    path = run.in_dir / name
    upstream = StageState(run.in_dir)
    info = upstream.read_stage()
    if info is None:
        return None if path.exists() else f"input {path} does not exist"
    if upstream.is_done(name) or (run.in_dir / "manifest.json").exists():
        return None if path.exists() else f"input {path} is marked done but missing (deleted?)"
    failed = upstream.read("failed", name)
    why = f"{info['stage']} failed it: {failed.get('error', '?')}" if failed else f"{info['stage']} has not finished it"
    return f"input {path} is not complete ({why})"


@contextlib.contextmanager
def _try_lock(state: StageState, name: str) -> Iterator[bool]:
    """A non-blocking exclusive lock file under ``_state/locks``; yields whether it was taken."""
    path = state.root / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _shard_lock(state: StageState, name: str) -> Iterator[None]:
    """An exclusive lock on one shard: two tasks must never write the same output file."""
    with _try_lock(state, name) as locked:
        if not locked:
            holder = state.read("running", name) or {}
            raise IptError(
                f"{name}: being processed by another task (job {holder.get('job', '?')} on"
                f" {holder.get('host', '?')}); not starting a second writer"
            )
        yield


def _job_id() -> str:
    """The Slurm job (``ARRAY_TASK``) or submitit local job running this task, else this process.

    Not ``submitit.JobEnvironment().job_id``: that needs ``SUBMITIT_EXECUTOR``, which a hand-written
    sbatch running ``run-shard`` (slurm/*.sbatch) does not set."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or f"pid-{os.getpid()}"
