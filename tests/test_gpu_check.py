"""``tools/gpu-check --smoke``: the prepared GPU check runs end to end on the CPU (tiny model, few steps), so it
cannot rot between the GPU sessions that run it for real; its report has every figure docs/benchmarks.md
quotes from it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("megatron.core")


@pytest.mark.slow
def test_gpu_check_smoke_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(REPO / "tools" / "gpu-check"), str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check: all sections passed" in proc.stdout
    report = json.loads((out / "check.json").read_text())
    sec = report["sections"]
    assert set(sec) == {"environment", "attention", "train:sdpa+fusions", "hf", "train:sdpa", "train:unfused"}
    assert sec["environment"]["megatron_core"] and sec["environment"]["torch"]
    rows = {r["impl"]: r for r in sec["attention"]["rows"]}
    for impl in ("unfused (Megatron)", "sdpa (dispatched)", "sdpa flash", "sdpa math"):
        assert rows[impl]["fwd_ms"] > 0 and rows[impl]["fwd_bwd_ms"] >= rows[impl]["fwd_ms"], rows[impl]
    assert rows["sdpa (dispatched)"]["kernel"] == "flash (native GQA)"
    for name in ("train:sdpa+fusions", "train:sdpa", "train:unfused"):
        run = sec[name]
        assert run["tokens_per_s"] > 0 and run["parameters"] > 0 and len(run["losses"]) == 4, run
        assert run["top_kernels"] and run["top_kernels"][0]["self_ms"] > 0  # the profiled last step
    assert sec["train:sdpa+fusions"]["fusions"] == {
        "swiglu_fusion": True,
        "cross_entropy_fusion": True,
        "rope_fusion": "compiled",
    }
    assert sec["train:unfused"]["attention"] == "unfused" and sec["train:sdpa"]["attention_kernel"]
    assert sec["hf"]["tokens_per_s"] > 0 and sec["hf"]["micro_batch_size"] == 2
    assert report["loss_gap"]["steps"] == 4 and report["loss_gap"]["max_abs"] < 1e-4
    md = (out / "check.md").read_text()
    for heading in ("## Attention core", "## Training, one GPU", "vs HF, same micro-batch", "Loss gap, unfused"):
        assert heading in md
    assert not (out / "work").exists()  # the runs' scratch folders are removed
