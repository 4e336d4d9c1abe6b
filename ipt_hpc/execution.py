"""Execution layer: runs a stage's per-item task function on a backend. Stages never see how.

Backends:
* ``debug``: in-process, one item after the other (for tests and pdb);
* ``local``: submitit's ``LocalExecutor``; items are packed into ``workers`` jobs (one process
  each), so 10,000 items never mean 10,000 processes.

Every item runs inside :func:`_run_pack`, which records a per-item error instead of losing the
rest of the pack; :func:`run_tasks` raises one :class:`TaskFailures` naming every failed item.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config import ExecutionConfig
from .errors import IptError

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, IptError):
        return str(exc)
    return "".join(traceback.format_exception(exc)).rstrip()


def _run_pack(fn: Callable[[Any], Any], items: Sequence[Any], labels: Sequence[str]) -> list[Outcome]:
    outcomes = []
    for item, label in zip(items, labels, strict=True):
        try:
            outcomes.append(Outcome(label, True, fn(item)))
        except Exception as exc:  # noqa: BLE001 - reported per item, by name, to the coordinator
            outcomes.append(Outcome(label, False, _describe(exc)))
    return outcomes


def _packs(n: int, k: int) -> list[list[int]]:
    """Split item indices 0..n-1 into k interleaved packs (balances sorted work sizes)."""
    return [list(range(i, n, k)) for i in range(k) if i < n]


def run_tasks(
    fn: Callable[[T], Any],
    items: Sequence[T],
    *,
    labels: Sequence[str],
    stage: str,
    cfg: ExecutionConfig,
    log_dir: Path,
    on_progress: Callable[[], None] | None = None,
) -> list[Any]:
    """Run ``fn(item)`` for every item on the configured backend; return values in item order.

    ``fn`` must be a picklable top-level function. ``on_progress`` is called about twice a second
    while work is in flight (the coordinator refreshes its progress display from markers).
    """
    if not items:
        return []
    if cfg.backend == "debug":
        outcomes = []
        for item, label in zip(items, labels, strict=True):
            outcomes.extend(_run_pack(fn, [item], [label]))
            if on_progress:
                on_progress()
    else:
        outcomes = _run_local(fn, items, labels, stage=stage, cfg=cfg, log_dir=log_dir, on_progress=on_progress)
    failures = [(o.label, str(o.value)) for o in outcomes if not o.ok]
    if failures:
        raise TaskFailures(stage, failures, len(items))
    return [o.value for o in outcomes]


def _run_local(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    labels: Sequence[str],
    *,
    stage: str,
    cfg: ExecutionConfig,
    log_dir: Path,
    on_progress: Callable[[], None] | None,
) -> list[Outcome]:
    import submitit

    workers = min(cfg.workers or os.cpu_count() or 1, len(items))
    executor = submitit.LocalExecutor(folder=log_dir / "%j")
    executor.update_parameters(timeout_min=cfg.timeout_min)
    packs = _packs(len(items), workers)
    pack_items = [[items[i] for i in pack] for pack in packs]
    pack_labels = [[labels[i] for i in pack] for pack in packs]
    jobs = executor.map_array(_run_pack, [fn] * len(packs), pack_items, pack_labels)
    while not all(job.done() for job in jobs):
        if on_progress:
            on_progress()
        time.sleep(0.5)
    by_index: dict[int, Outcome] = {}
    for job, pack, plabels in zip(jobs, packs, pack_labels, strict=True):
        try:
            results = job.result()
        except Exception as exc:  # noqa: BLE001 - the whole worker died (killed, out of memory, ...)
            msg = f"worker job {job.job_id} died ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r});"
            msg += f" logs: {log_dir / str(job.job_id)}"
            results = [Outcome(label, False, msg) for label in plabels]
        for index, outcome in zip(pack, results, strict=True):
            by_index[index] = outcome
    if on_progress:
        on_progress()
    return [by_index[i] for i in range(len(items))]
