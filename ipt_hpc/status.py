"""``status`` of a run: every stage's shards done / running / pending / failed / never submitted,
records, tokens, throughput and ETA (see :mod:`ipt_hpc.execution.monitor` for the rules)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .execution.monitor import resume_command, stage_status
from .layout import STATE, RunLayout, state_dir


def find_stages(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Stage folders of a run (those with ``_state/stage.json``), in pipeline order."""
    run = Path(run_dir)
    layout = RunLayout.of(run)
    order = [p.name for p in (layout.raw, layout.synth, layout.augmented, layout.tokens, layout.checkpoints)]
    if (state_dir(run) / "stage.json").exists():
        return [run]
    marker = f"{STATE}/stage.json"
    found = [p.parent.parent for p in [*run.glob(f"*/{marker}"), *layout.tokens.glob(f"*/{marker}")]]

    def rank(p: Path) -> tuple[int, str]:
        top = p.relative_to(run).parts[0]
        return (order.index(top) if top in order else len(order), str(p))

    return sorted(found, key=rank)


def run_status(run_dir: str | os.PathLike[str], *, use_queue: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    stages = [stage_status(p, use_queue=use_queue) for p in find_stages(run_dir)]
    return {
        "run": str(run_dir),
        "stages": stages,
        "root_cause": root_cause(stages),
        "seconds": round(time.perf_counter() - started, 3),
    }


def root_cause(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first failure in pipeline order of a shard that started (later stages' shards that never
    started are its consequence): stage, shard, error, traceback log and the command that resumes."""
    for st in stages:
        if st["started_failures"]:
            name = st["started_failures"][0]
            return {
                "stage": st["name"],
                "shard": name,
                "error": st["failures"][name],
                "log": st["failure_logs"].get(name),
                "failed": len(st["started_failures"]),
                "resume": resume_command(st["folder"]),
            }
    return None
