"""Pipeline stages through the real local Slurm cluster (tools/local-slurm up): the same stage code as
on the local executor, submitted as job arrays."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fanout import make_raw
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster
from test_templify import cfg, make_synth, outputs

from ipt_hpc import templify
from ipt_hpc.atomic import read_json

pytestmark = pytest.mark.slurm


def test_templify_on_slurm(tmp_path: Path) -> None:
    run = make_synth(make_raw(tmp_path / "run", 3, docs=60), 3)
    result = templify.run(cfg(**{"execution.backend": "slurm", "execution.slurm.time_min": 10}), run, wait=True)
    assert result["submitted"] == 3
    manifest = read_json(run / "augmented" / "manifest.json")
    assert len(outputs(run, 3)) == manifest["totals"]["records"] > 0
    assert manifest["totals"]["pairs"] == manifest["totals"]["pairs_in"] > 0


def test_whole_pipeline_through_slurm_arrays_and_dependencies(tmp_path: Path) -> None:
    """The demo config end to end on the local cluster: arrays per stage, afterok chains, one job each for
    the coordinators, training, export, eval and the report (a tiny random synthesizer keeps it short)."""
    import subprocess
    import time

    from conftest import run_cli
    from tiny_model import tiny_llama

    model = tiny_llama(tmp_path / "synth")
    run = tmp_path / "run"
    sets = {
        "synth.model": model,
        "tokenize.tokenizer": model,
        "synth.max_new_tokens": 8,
        "synth.max_model_len": 512,
        "train.model.vocab_size": 512,
        "train.train_iters": 12,
        "train.save_interval": 6,
        "execution.slurm.time_min": 20,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = run_cli("pipeline", "--config", "configs/demo.yaml", "--run", str(run), "--executor", "slurm", *args)
    assert proc.returncode == 0, proc.stderr
    assert "afterok" in proc.stdout + proc.stderr
    deadline = time.time() + 600
    report = run / "report" / "report.md"
    while time.time() < deadline and not report.exists():
        time.sleep(3)
    queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    assert report.exists(), f"pipeline did not finish in time; queue:\n{queue}"
    for path in ("tokens/augmented.bin", "tokens/raw.bin", "mixture.json", "train/done.json", "hf/config.json"):
        assert (run / path).exists(), path
    assert read_json(run / "eval" / "demo.json")["results"]["demo_mc"]
    text = report.read_text()
    assert "## Training" in text and "## Evaluation" in text and "## Mixture" in text
