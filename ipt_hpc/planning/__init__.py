"""``plan``: what a run will cost before it is submitted, from a measured calibration.

:func:`.calibrate.calibrate` runs the real stages on a sample and keeps per-document figures;
:func:`.estimate.make_plan` scales them to the corpus and the cluster; :mod:`.compare` sets the plan
beside what the run measured (``status`` and the report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import read_json, write_json_atomic
from ..config import Config, data_hash
from ..errors import IptError
from ..layout import RunLayout
from .calibrate import Say, calibrate, calibration_file
from .estimate import make_plan


def plan(
    cfg: Config,
    run_dir: str | Path,
    *,
    calibrate_docs: int | None = None,
    docs: int | None = None,
    doctor: str | Path | None = None,
    say: Say = print,
) -> dict[str, Any]:
    """Calibrate (when ``calibrate_docs`` is given) or reuse the run's calibration, make the plan and store it
    as ``RUN/plan.json``."""
    if calibrate_docs is not None:
        cal = calibrate(cfg, run_dir, calibrate_docs, say=say)
    else:
        path = calibration_file(run_dir)
        if not path.exists():
            raise IptError(
                f"plan: {run_dir} has no calibration yet ({path}); run plan --calibrate N first (N sample documents,"
                " e.g. 40)"
            )
        cal = read_json(path)
    result = make_plan(cfg, cal, docs=docs, doctor=doctor)
    result["config_hash"] = data_hash(cfg)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(RunLayout.of(run_dir).plan, result)
    return result


__all__ = ["calibrate", "make_plan", "plan"]
