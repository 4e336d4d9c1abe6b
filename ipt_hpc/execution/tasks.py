"""Running a task function over items on a backend, and the checkpointable pack runner.

An *item* is whatever one call of the task function handles (an input file to scan, a shard to
write or synthesize). Items are grouped into *packs*, one pack per job or array task; a pack runs
in :class:`PackRunner`, which records a per-item error instead of losing the rest of the pack and
which submitit checkpoints and requeues on the warning signal (preemption, time limit).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import submitit

from ..config import ExecutionConfig
from ..errors import IptError
from . import backends

T = TypeVar("T")


class TaskFailures(IptError):
    """One or more items of a stage failed; the message groups them, one line per distinct error.

    ``failures`` holds ``(label, one-line message)`` pairs; ``hint`` (e.g. the command that resumes)
    ends the message.
    """

    def __init__(self, stage: str, failures: list[tuple[str, str]], total: int, hint: str = "") -> None:
        self.stage = stage
        self.failures = failures
        groups = group_failures(failures)
        noun = "shards" if all(label.startswith("shard-") for label, _ in failures) else "tasks"
        shown = "\n".join(f"  - {failure_line(labels, msg, noun)}" for labels, msg in groups[:10])
        more = f"\n  ... and {len(groups) - 10} more kinds of error" if len(groups) > 10 else ""
        tail = f"\n{hint}" if hint else ""
        super().__init__(f"{stage}: {len(failures)} of {total} {noun} failed:\n{shown}{more}{tail}")


def group_failures(failures: Sequence[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """Failures that differ only in numbers (shard ids, line numbers, byte counts) form one group:
    ``[(labels, the first one's message), ...]``, largest group first."""
    groups: dict[str, tuple[list[str], str]] = {}
    for label, msg in failures:
        text = msg.strip()
        bare = text[len(label) + 1 :] if text.startswith(label + ":") else text
        labels, _ = groups.setdefault(re.sub(r"\d+", "#", bare), ([], text))
        labels.append(label)
    return sorted(groups.values(), key=lambda g: -len(g[0]))


def failure_line(labels: list[str], msg: str, noun: str = "shards") -> str:
    """One line for a group of :func:`group_failures`: who failed, then the (first) message."""
    if len(labels) == 1:
        return msg if msg.startswith(labels[0] + ":") else f"{labels[0]}: {msg}"
    shown = ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")
    return f"{len(labels)} {noun} ({shown}): {msg}"


@dataclass(frozen=True)
class Outcome:
    label: str
    ok: bool
    value: Any  # the task's return value, or the error text


def describe(exc: BaseException) -> str:
    """The message a user can act on, in one line: ours verbatim, anything else as ``Type: message``
    (the traceback goes to a log file: :func:`keep_traceback`). A full disk says where and how full."""
    if isinstance(exc, IptError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = exc.filename or "?"
        return f"no space left on device writing {where} (free {_free(where)})"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _free(path: str) -> str:
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB"
    except OSError:
        return "unknown"


def keep_traceback(path: str | os.PathLike[str], exc: BaseException, header: str = "") -> Path | None:
    """Append ``exc``'s full traceback to the log file ``path`` (created with its folder); returns it,
    or None when it could not be written (a full disk)."""
    path = Path(path)
    text = "".join(traceback.format_exception(exc)).rstrip()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"== {stamp} {header}\n{text}\n")
    except OSError:
        return None  # a full disk may refuse the log too; the one-line error still reaches the user
    return path


class PackRunner(submitit.helpers.Checkpointable):
    """Runs ``fn(item)`` for each item of a pack; checkpointed and requeued by submitit.

    On the warning signal (USR2) submitit calls :meth:`checkpoint`: the task function's
    ``on_preempt()`` hook (if any) makes its progress durable, and the same pack is requeued.
    Items already complete are skipped by the task function itself (completion markers), and a
    partly done item resumes from its last durable record. SIGTERM (sent by ``scontrol requeue``
    before SIGKILL) triggers the same hook.
    """

    def __init__(self, fn: Callable[[Any], Any], *, strict: bool = False, log_dir: str | None = None) -> None:
        self.fn = fn
        self.strict = strict  # fail the job when an item failed (so Slurm's afterok sees it)
        self.log_dir = log_dir  # where an item's traceback is kept (tracebacks/<label>.log)

    def __call__(self, items: Sequence[Any], labels: Sequence[str]) -> list[Outcome]:
        self._install_sigterm()
        outcomes = [
            self.run_item(item, label, items[k + 1 :])
            for k, (item, label) in enumerate(zip(items, labels, strict=True))
        ]
        failed = [o for o in outcomes if not o.ok]
        if self.strict and failed:
            raise TaskFailures("pack", [(o.label, str(o.value)) for o in failed], len(outcomes))
        return outcomes

    def run_item(self, item: Any, label: str, upcoming: Sequence[Any] = ()) -> Outcome:
        """``fn(item)`` as an outcome. A task function with ``set_upcoming`` learns first which items
        this pack runs after this one (a hint, e.g. to start reading the next input early)."""
        set_upcoming = getattr(self.fn, "set_upcoming", None)
        if set_upcoming is not None:
            set_upcoming(list(upcoming))
        try:
            return Outcome(label, True, self.fn(item))
        except Exception as exc:  # noqa: BLE001 - reported per item, by name, to the coordinator
            msg = describe(exc)
            if self.log_dir is not None and not isinstance(exc, IptError):
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[-150:]
                log = keep_traceback(Path(self.log_dir) / "tracebacks" / f"{safe}.log", exc, f"{label} job {_job()}")
                msg = f"{msg} (traceback: {log})" if log else msg
            return Outcome(label, False, msg)

    def _preempted(self) -> None:
        hook = getattr(self.fn, "on_preempt", None)
        if hook is not None:
            hook()

    def _install_sigterm(self) -> None:
        if not os.environ.get("SLURM_JOB_ID"):
            return

        def on_term(signum: int, frame: Any) -> None:
            self._preempted()  # make progress durable; Slurm's SIGKILL follows after KillWait

        signal.signal(signal.SIGTERM, on_term)

    def checkpoint(self, items: Sequence[Any], labels: Sequence[str]) -> submitit.helpers.DelayedSubmission:
        self._preempted()
        again = PackRunner(self.fn, strict=self.strict, log_dir=self.log_dir)
        return submitit.helpers.DelayedSubmission(again, items, labels)


def _job() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or f"pid-{os.getpid()}"


def run_tasks(
    fn: Callable[[T], Any],
    items: Sequence[T],
    *,
    labels: Sequence[str],
    stage: str,
    cfg: ExecutionConfig,
    log_dir: Path,
    on_progress: Callable[[], None] | None = None,
    on_submit: Callable[[backends.Submission], Any] | None = None,
    dependency: str | None = None,
) -> list[Any]:
    """Run ``fn(item)`` for every item on the configured backend and wait; values in item order.

    ``fn`` must be picklable (a top-level function or an object of a top-level class).
    ``on_progress`` is called about every second while work is in flight. Raises
    :class:`TaskFailures` naming every failed item.
    """
    if not items:
        return []
    if cfg.backend == "debug":
        outcomes = []
        runner = PackRunner(fn, log_dir=str(log_dir))
        for k, (item, label) in enumerate(zip(items, labels, strict=True)):
            outcomes.append(runner.run_item(item, label, items[k + 1 :]))
            if on_progress:
                on_progress()
    elif cfg.backend == "local":
        outcomes = _run_local(fn, items, labels, cfg=cfg, log_dir=log_dir, on_progress=on_progress)
    else:
        sub = backends.submit_arrays(
            PackRunner(fn, log_dir=str(log_dir)),
            items,
            labels,
            cfg=cfg,
            log_dir=log_dir,
            job_name=f"ipt-{stage.replace('/', '-')}",
            dependency=dependency,
        )
        if on_submit:
            on_submit(sub)
        backends.wait_for_jobs(sub.job_ids, on_poll=on_progress)
        outcomes = collect(sub.jobs, [[items[i] for i in t] for a in sub.arrays for t in a["tasks"]], labels, log_dir)
    failures = [(o.label, str(o.value)) for o in outcomes if not o.ok]
    if failures:
        raise TaskFailures(stage, failures, len(items))
    return [o.value for o in outcomes]


def collect(jobs: Sequence[Any], packs: Sequence[Sequence[Any]], labels: Sequence[str], log_dir: Path) -> list[Outcome]:
    """Outcomes of finished jobs, in item order; a job that died fails each of its items."""
    outcomes: list[Outcome] = []
    it = iter(labels)
    for job, pack_items in zip(jobs, packs, strict=True):
        pack_labels = [next(it) for _ in pack_items]
        try:
            outcomes.extend(job.result())
        except Exception as exc:  # noqa: BLE001 - the whole worker died (killed, out of memory, ...)
            msg = f"worker job {job.job_id} died ({_cause(exc, job)}); log: {log_dir / str(job.job_id)}"
            outcomes.extend(Outcome(label, False, msg) for label in pack_labels)
    return outcomes


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


_ERRNO_LINE = re.compile(r"\[Errno (\d+)\] (.+)")


def _cause(exc: BaseException, job: Any = None) -> str:
    """The useful line of a submitit failure: the inner exception, not the log-path boilerplate; where
    there is none (the worker could not even write its result), the last error its log shows."""
    lines = [line.strip() for line in str(exc).splitlines() if _EXC_LINE.match(line.strip())]
    if lines:
        return lines[-1]
    logged = ""
    for read in (getattr(job, "stderr", None), getattr(job, "stdout", None)):
        try:
            text = (read() if read else None) or ""
        except Exception:  # noqa: BLE001 - a log that cannot be read just adds nothing
            text = ""
        found = [m.group(0) for m in _ERRNO_LINE.finditer(text)]
        found += [line.strip() for line in text.splitlines() if _EXC_LINE.match(line.strip())]
        logged = found[-1] if found else logged
    if logged:
        if "[Errno 28]" in logged:
            folder = str(getattr(getattr(job, "paths", None), "folder", "") or "")
            return f"no space left on device writing its result in {folder} (free {_free(folder + '/x')})"
        return f"its log says: {logged}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run_local(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    labels: Sequence[str],
    *,
    cfg: ExecutionConfig,
    log_dir: Path,
    on_progress: Callable[[], None] | None,
) -> list[Outcome]:
    """``workers`` submitit local jobs, each a pack of interleaved items (no process per item)."""
    workers = min(cfg.workers or os.cpu_count() or 1, len(items))
    executor = backends.local_executor(cfg, log_dir, workers)
    packs = [list(range(i, len(items), workers)) for i in range(workers)]
    jobs = [
        executor.submit(PackRunner(fn, log_dir=str(log_dir)), [items[i] for i in p], [labels[i] for i in p])
        for p in packs
    ]
    while not all(job.done() for job in jobs):
        if on_progress:
            on_progress()
        time.sleep(0.25)
    if on_progress:
        on_progress()
    by_index: dict[int, Outcome] = {}
    ordered_labels = [labels[i] for p in packs for i in p]
    outcomes = collect(jobs, [[items[i] for i in p] for p in packs], ordered_labels, log_dir)
    for index, outcome in zip([i for p in packs for i in p], outcomes, strict=True):
        by_index[index] = outcome
    return [by_index[i] for i in range(len(items))]
