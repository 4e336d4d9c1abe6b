"""Running a task function over items on a backend, and the checkpointable pack runner.

An *item* is whatever one call of the task function handles (an input file to scan, a shard to
write or synthesize). Items are grouped into *packs*, one pack per job or array task; a pack runs
in :class:`PackRunner`, which records a per-item error instead of losing the rest of the pack and
which submitit checkpoints and requeues on the warning signal (preemption, time limit).
"""

from __future__ import annotations

import os
import re
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
    """One or more items of a stage failed; the message lists them."""

    def __init__(self, stage: str, failures: list[tuple[str, str]], total: int) -> None:
        self.failures = failures
        shown = "\n".join(
            f"  - {msg.strip() if msg.startswith(label + ':') else f'{label}: {msg.strip()}'}"
            for label, msg in failures[:10]
        )
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{stage}: {len(failures)} of {total} tasks failed:\n{shown}{more}")


@dataclass(frozen=True)
class Outcome:
    label: str
    ok: bool
    value: Any  # the task's return value, or the error text


def describe(exc: BaseException) -> str:
    """The message a user needs: ours verbatim, anything else with its traceback."""
    if isinstance(exc, IptError):
        return str(exc)
    return "".join(traceback.format_exception(exc)).rstrip()


class PackRunner(submitit.helpers.Checkpointable):
    """Runs ``fn(item)`` for each item of a pack; checkpointed and requeued by submitit.

    On the warning signal (USR2) submitit calls :meth:`checkpoint`: the task function's
    ``on_preempt()`` hook (if any) makes its progress durable, and the same pack is requeued.
    Items already complete are skipped by the task function itself (completion markers), and a
    partly done item resumes from its last durable record. SIGTERM (sent by ``scontrol requeue``
    before SIGKILL) triggers the same hook.
    """

    def __init__(self, fn: Callable[[Any], Any], *, strict: bool = False) -> None:
        self.fn = fn
        self.strict = strict  # fail the job when an item failed (so Slurm's afterok sees it)

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
            return Outcome(label, False, describe(exc))

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
        return submitit.helpers.DelayedSubmission(PackRunner(self.fn, strict=self.strict), items, labels)


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
        runner = PackRunner(fn)
        for k, (item, label) in enumerate(zip(items, labels, strict=True)):
            outcomes.append(runner.run_item(item, label, items[k + 1 :]))
            if on_progress:
                on_progress()
    elif cfg.backend == "local":
        outcomes = _run_local(fn, items, labels, cfg=cfg, log_dir=log_dir, on_progress=on_progress)
    else:
        sub = backends.submit_arrays(
            PackRunner(fn),
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
            msg = f"worker job {job.job_id} died ({_cause(exc)}); log: {log_dir / str(job.job_id)}"
            outcomes.extend(Outcome(label, False, msg) for label in pack_labels)
    return outcomes


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def _cause(exc: BaseException) -> str:
    """The useful line of a submitit failure: the inner exception, not the log-path boilerplate."""
    lines = [line for line in str(exc).splitlines() if _EXC_LINE.match(line.strip())]
    if lines:
        return lines[-1].strip()
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
    executor = backends.local_executor(cfg, log_dir)
    packs = [list(range(i, len(items), workers)) for i in range(workers)]
    jobs = [executor.submit(PackRunner(fn), [items[i] for i in p], [labels[i] for i in p]) for p in packs]
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
