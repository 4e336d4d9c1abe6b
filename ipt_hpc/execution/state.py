"""Per-stage bookkeeping on disk: completion markers, failures, running tasks, attempts, submissions.

Layout of ``<stage dir>/_state``::

    stage.json                 stage name, shard count, config hash (written once; guards reuse)
    done/<shard>.json          written only after the shard's output is durable (fsync + rename)
    failed/<shard>.json        last error of a shard that is not done
    running/<shard>.json       job id, host, pid, attempt, progress of a shard being worked on
    attempts/<shard>.jsonl     one line per event (start, done, failed, preempted): the attempt log
    submissions/<time>.json    what was submitted where: backend, job ids, shards per array task

Everything here is plain JSON so that ``status`` is a directory scan, fast on 10,000 shards.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from ..atomic import read_json, write_json_atomic
from ..layout import state_dir

KINDS = ("done", "failed", "running")


def now() -> float:
    return round(time.time(), 3)


def stage_label(stage: str, folder: str | os.PathLike[str]) -> str:
    """How ``status``, the pipeline and the plan name a stage: a run has one tokenize stage per group
    (``RUN/tokens/<group>``) and one decontaminate stage per input (``RUN/raw-clean``, ``RUN/synth-clean``),
    told apart by the folder's name."""
    return f"{stage} {Path(folder).name}" if stage in ("tokenize", "decontaminate") else stage


def wall_span(markers: list[dict[str, Any]]) -> float | None:
    """Seconds from the first shard's start to the last one's finish, by their done markers (None: none)."""
    timed = [(m["finished"] - m.get("seconds", 0.0), m["finished"]) for m in markers if "finished" in m]
    return max(end for _, end in timed) - min(start for start, _ in timed) if timed else None


def shard_name(k: int, num_shards: int) -> str:
    """File name of shard ``k`` (zero-padded to at least 5 digits), the same in every stage."""
    return f"shard-{k:0{max(5, len(str(num_shards - 1)))}d}.jsonl.zst"


class StageState:
    """Markers of one stage folder (see the module docstring)."""

    def __init__(self, stage_dir: str | os.PathLike[str]) -> None:
        self.stage_dir = Path(stage_dir)
        self.root = state_dir(self.stage_dir)

    # -- paths ---------------------------------------------------------------------------
    def marker(self, kind: str, name: str) -> Path:
        return self.root / kind / f"{name}.json"

    def attempts_path(self, name: str) -> Path:
        return self.root / "attempts" / f"{name}.jsonl"

    # -- stage identity ------------------------------------------------------------------
    def read_stage(self) -> dict[str, Any] | None:
        path = self.root / "stage.json"
        return read_json(path) if path.exists() else None

    def write_stage(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.root / "stage.json", info)

    # -- markers -------------------------------------------------------------------------
    def names(self, kind: str) -> set[str]:
        """Shard names holding a marker of ``kind`` (one directory scan)."""
        try:
            with os.scandir(self.root / kind) as it:
                return {e.name[:-5] for e in it if e.name.endswith(".json")}
        except FileNotFoundError:
            return set()

    def read_all(self, kind: str) -> list[dict[str, Any]]:
        """Every marker of ``kind`` (e.g. the done shards' stats), in shard order."""
        folder = self.root / kind
        return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    def is_done(self, name: str) -> bool:
        return self.marker("done", name).exists()

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        return _json_or_none(self.marker(kind, name))

    def mark_running(self, name: str, info: dict[str, Any]) -> None:
        """Progress for ``status`` (advisory: not fsynced; a crash may leave it empty, which reads as absent)."""
        write_json_atomic(self.marker("running", name), info, durable=False)

    def mark_done(self, name: str, stats: dict[str, Any]) -> None:
        """Record a durable shard; call only after its output file was renamed into place."""
        write_json_atomic(self.marker("done", name), stats)
        self.marker("failed", name).unlink(missing_ok=True)
        self.marker("running", name).unlink(missing_ok=True)

    def mark_failed(self, name: str, info: dict[str, Any]) -> None:
        write_json_atomic(self.marker("failed", name), info)
        self.marker("running", name).unlink(missing_ok=True)

    def clear(self, name: str) -> None:
        for kind in KINDS:
            self.marker(kind, name).unlink(missing_ok=True)

    # -- attempts ------------------------------------------------------------------------
    def log_event(self, name: str, event: str, **fields: Any) -> None:
        """Append one event to the shard's attempt log (O_APPEND: concurrent writers are safe).

        Not fsynced: the log counts attempts (``execution.max_attempts``) and explains them; what decides a
        shard is its done marker, which is. A node crash may take the last events or leave a torn line,
        which :meth:`events` skips."""
        path = self.attempts_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps({"event": event, "time": now(), **fields}, option=orjson.OPT_APPEND_NEWLINE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The shard's attempt log, oldest first (a line a crash tore, or a blank one, is skipped)."""
        try:
            fh = open(self.attempts_path(name), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return []
        out = []
        with fh:
            for line in fh:
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(event, dict) and "event" in event and "time" in event:
                    out.append(event)
        return out

    # -- submissions ---------------------------------------------------------------------
    def record_submission(self, info: dict[str, Any]) -> Path:
        folder = self.root / "submissions"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = folder / f"{stamp}-{os.getpid()}-{len(list(folder.iterdir())):04d}.json"
        # history for status and plan (advisory: not fsynced; a crash may leave one empty, which is skipped)
        write_json_atomic(path, {"time": now(), "host": socket.gethostname(), **info}, durable=False)
        return path

    def end_submission(self, path: Path) -> None:
        """Mark a blocking (local/debug) submission as over, so ``status`` stops counting on it."""
        write_json_atomic(path, {**read_json(path), "ended": now()}, durable=False)

    def submissions(self) -> list[dict[str, Any]]:
        paths = sorted((self.root / "submissions").glob("*.json"))
        return [info for info in map(_json_or_none, paths) if info is not None]


def _json_or_none(path: Path) -> Any:
    """A marker's content; None when it is missing or not whole JSON (an advisory file a crash emptied)."""
    try:
        return read_json(path)
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
