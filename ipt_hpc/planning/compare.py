"""Plan vs actual: each planned stage's predicted wall time and output size next to what the run measured.

Actual wall time is the pipeline step's own duration where the pipeline ran here (``RUN/_state/steps.jsonl``),
else the span of the stage's shard markers (first start to last finish; Slurm queue waits excluded, as in
the plan). Actual size is what the stage left on disk, measured as the calibration measured it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import read_json
from ..execution.state import StageState, wall_span
from ..layout import STATE, RunLayout


def folder_bytes(folder: Path) -> int:
    """Bytes of the files a stage wrote (its bookkeeping folder left out)."""
    if folder.is_file():
        return folder.stat().st_size
    files = (p for p in folder.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files if STATE not in p.relative_to(folder).parts)


def output_bytes(run: Path, folder: Path) -> int:
    """What a stage leaves on disk: its folder, and for a token group its merged ``.bin``/``.idx``."""
    return sum(scaling_and_fixed_bytes(run, folder))


def scaling_and_fixed_bytes(run: Path, folder: Path) -> tuple[int, int]:
    """A stage's output bytes that grow with the documents (its shards, a token group's merged dataset)
    and those that do not (manifest, charts, the tokenizer copy)."""
    total = folder_bytes(folder) if folder.exists() else 0
    shards = sum(p.stat().st_size for p in folder.glob("shard-*") if p.is_file()) if folder.is_dir() else 0
    merged = 0
    if folder.parent == RunLayout.of(run).tokens:
        merged = sum(folder.with_suffix(s).stat().st_size for s in (".bin", ".idx") if folder.with_suffix(s).exists())
    return shards + merged, total - shards


def load_plan(run_dir: str | Path) -> dict[str, Any] | None:
    path = RunLayout.of(run_dir).plan
    return read_json(path) if path.exists() else None


def _actual_folder(run: RunLayout, stage: dict[str, Any]) -> Path | None:
    if stage.get("folder"):
        return run.root / stage["folder"]
    return {"train": run.checkpoints, "export": run.hf}.get(stage["stage"])


def rows(run_dir: str | Path, plan: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per planned stage: predicted and actual wall seconds and output bytes (None: not yet)."""
    from ..timeline import step_walls

    plan = plan or load_plan(run_dir)
    if plan is None:
        return []
    run = RunLayout.of(run_dir)
    walls = step_walls(run_dir)
    out = []
    for stage in plan["stages"]:
        folder = _actual_folder(run, stage)
        wall = walls.get(stage["stage"])
        done = total = None
        if stage["kind"] == "data" and folder is not None:
            markers = StageState(folder).read_all("done")
            span, done = wall_span(markers), len(markers)
            total = stage["layout"]["shards"]
            wall = wall if wall is not None else (span if done == total else None)
        size = output_bytes(run.root, folder) if folder is not None and folder.exists() else None
        out.append(
            {
                "stage": stage["stage"],
                "planned_wall_s": stage["wall_s"],
                "actual_wall_s": wall,
                "planned_bytes": stage["output_bytes"],
                "actual_bytes": size if (size and (total is None or done == total)) else None,
                "shards_done": done,
                "shards": total,
            }
        )
    return out


def ratio(actual: float | None, planned: float) -> float | None:
    """actual / planned (None when there is no actual figure yet, or nothing was planned)."""
    return actual / planned if actual is not None and planned else None


def fmt_bytes(n: float | None) -> str:
    """``1.2 GB`` (decimal units, as disks are sold and quotas set)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return "-"  # unreachable


def fmt_seconds(s: float | None) -> str:
    """``42 s``, ``3.5 min``, ``7.2 h``, ``3.1 d``."""
    if s is None:
        return "-"
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:,.1f} h"
    return f"{s / 86400:,.1f} d"
