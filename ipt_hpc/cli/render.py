"""How the commands show things: the console, the progress bars, tables, dry runs and failures.

Messages go to stderr through a rich console; results a script reads (a table from ``eval``, a status
in JSON, an sbatch script) go to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def console() -> Any:
    """The console of messages and progress (stderr)."""
    from rich.console import Console

    return Console(stderr=True)


def progress_reporter(out: Any) -> tuple[Any, Callable[[str, int, int], None]]:
    """A rich progress display (a context manager) and ``update(phase, done, total)``: one bar per phase."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = prog.add_task(phase, total=total)
        prog.update(tasks[phase], completed=done, total=total)

    return prog, update


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> Any:
    """A rich table: the first ``left`` columns aligned left, the others right."""
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        t.add_row(*row)
    return t


class Whole(str):
    """A dry-run line printed on one line however wide (a command to copy)."""


def dry_run(out: Any, lines: Iterable[str]) -> int:
    """Print what a command would do, a line each, and return its exit status (0): through the console
    ``out``, or without one plainly to stdout."""
    for line in lines:
        if out is None:
            print(line)
        else:
            out.print(line, soft_wrap=isinstance(line, Whole))
    return 0


def stderr_log(msg: str) -> None:
    """A stage's log line, plainly to stderr."""
    print(msg, file=sys.stderr)


def print_failures(out: Any, report: dict[str, Any]) -> None:
    """The root cause first (stage, shard, reason, traceback, the command that resumes), then the rest."""
    from rich.markup import escape

    from ..execution.tasks import failure_line, group_failures

    root = report.get("root_cause")
    if root:
        more = f" (and {root['failed'] - 1} more shard(s) of this stage)" if root["failed"] > 1 else ""
        out.print(
            f"[bold red]first failure: {root['stage']} {root['shard']}{more}[/]: {escape(root['error'])}",
            soft_wrap=True,
        )
        if root["log"]:
            out.print(f"  traceback: {root['log']}", soft_wrap=True)
        out.print(f"  resume: {escape(root['resume'])}", soft_wrap=True)
    for st in report["stages"]:
        rest = [
            (n, e)
            for n, e in st["failures"].items()
            if not (root and (st["name"], n) == (root["stage"], root["shard"]))
        ]
        for labels, error in group_failures(rest)[:5]:
            out.print(f"[red]{st['name']}[/red] {escape(failure_line(labels, error))}", soft_wrap=True)
        if st["queue_error"]:
            out.print(f"[yellow]Slurm queue not readable: {st['queue_error']}")
        if st.get("held_jobs"):
            jobs = ",".join(st["held_jobs"])
            out.print(f"[yellow]{st['name']}: Slurm holds job(s) {jobs}; they will not run until released"
                      f" (scontrol release {jobs})", soft_wrap=True)  # fmt: skip
