"""``status`` of a run: every stage's shards done / running / pending / failed / never submitted,
records, tokens, throughput and ETA (see :mod:`ipt_hpc.execution.monitor` for the rules)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .execution.monitor import stage_status


def find_stages(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Stage folders of a run (those with ``_state/stage.json``), in pipeline order."""
    order = ["raw", "synth", "augmented", "tokens", "checkpoints"]
    run = Path(run_dir)
    if (run / "_state" / "stage.json").exists():
        return [run]
    found = [p.parent.parent for p in [*run.glob("*/_state/stage.json"), *run.glob("tokens/*/_state/stage.json")]]

    def rank(p: Path) -> tuple[int, str]:
        top = p.relative_to(run).parts[0]
        return (order.index(top) if top in order else len(order), str(p))

    return sorted(found, key=rank)


def run_status(run_dir: str | os.PathLike[str], *, use_queue: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    stages = [stage_status(p, use_queue=use_queue) for p in find_stages(run_dir)]
    return {"run": str(run_dir), "stages": stages, "seconds": round(time.perf_counter() - started, 3)}
