"""Pipeline stages through the real local Slurm cluster (tools/local-slurm up): the same stage code as
on the local executor, submitted as job arrays. The whole pipeline on Slurm: tests/test_chaos_slurm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fanout import make_raw
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster
from test_templify import cfg, make_synth, outputs

from ipt_hpc.atomic import read_json
from ipt_hpc.execution import run_stage
from ipt_hpc.stages import templify

pytestmark = pytest.mark.slurm


def test_templify_on_slurm(tmp_path: Path) -> None:
    run = make_synth(make_raw(tmp_path / "run", 3, docs=60), 3)
    result = run_stage(
        templify.STAGE, cfg(**{"execution.backend": "slurm", "execution.slurm.time_min": 10}), run, wait=True
    )
    assert result["submitted"] == 3
    manifest = read_json(run / "augmented" / "manifest.json")
    assert len(outputs(run, 3)) == manifest["totals"]["records"] > 0
    t = manifest["totals"]
    assert t["pairs"] + t["pairs_dropped"] == t["pairs_in"] and t["pairs"] > 0  # malformed pairs are dropped
