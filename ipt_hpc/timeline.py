"""When each pipeline step ran: ``RUN/_state/steps.jsonl``, one JSON line per step that finished here.

The pipeline appends to it (``run_here``); the plan-vs-actual table of ``status`` and the report read it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .layout import RunLayout


def log_step(path: Path, name: str, started: float) -> None:
    """Append when a step ran to ``RUN/_state/steps.jsonl`` (the plan-vs-actual table reads it)."""
    import orjson

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(orjson.dumps({"step": name, "started": started, "finished": time.time()}) + b"\n")


def step_walls(run_dir: str | Path) -> dict[str, float]:
    """Seconds of each step's latest run here (``run_here``), by step name."""
    import orjson

    path = RunLayout.of(run_dir).steps_log
    walls = {}
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line torn by a crash
        walls[entry["step"]] = entry["finished"] - entry["started"]
    return walls
