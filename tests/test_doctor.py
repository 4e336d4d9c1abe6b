"""``doctor``: the CPU parts run and pass through the real code paths; ``--gpu --dry-run`` prints its plan.

The CPU run happens with ``datasets``, ``lm_eval`` and ``vllm`` made unimportable (a package of each name
that raises on import, first on PYTHONPATH, inherited by torchrun's ranks and the export): the doctor must
run on a bare GPU node that has torch and transformers plus the carried light wheels only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("megatron.core")
BLOCKED = ("datasets", "lm_eval", "vllm")


def doctor(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ipt_hpc.launch", "doctor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_gpu_dry_run_prints_the_plan() -> None:
    proc = doctor("--gpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for name in ("cuda", "nccl", "bf16", "synthesis", "train", "hf_baseline", "resume", "export"):
        assert f"  {name} " in proc.stdout
    assert "348.7M parameters" in proc.stdout and "bf16, distributed optimizer" in proc.stdout


def test_subprocesses_import_the_package_from_a_checkout(tmp_path: Path) -> None:
    """The doctor's torchrun and export run in a scratch folder. On an H200 with ipt_hpc used from a checkout
    (not installed), ``python -m ipt_hpc.model.train`` failed there with "No module named 'ipt_hpc'" before the
    doctor passed the package root on. ``-S`` keeps site-packages (and an editable install) out."""
    from ipt_hpc.doctor import _child_env

    probe = [sys.executable, "-S", "-c", "import ipt_hpc; print(ipt_hpc.__file__)"]
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run(probe, cwd=tmp_path, env=bare, capture_output=True).returncode != 0
    env = _child_env()
    proc = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == REPO / "ipt_hpc"


@pytest.mark.slow
def test_cpu_doctor_passes_without_the_heavy_dependencies(tmp_path: Path) -> None:
    block = tmp_path / "block"
    for name in BLOCKED:
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is not on a bare GPU node')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO)]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "doctor.json"
    proc = doctor("--out", str(out), "--work", str(tmp_path / "work"), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["mode"] == "cpu" and report["ok"]
    assert set(checks) == {"environment", "records", "synthesis", "train", "hf_baseline", "resume", "export"}
    assert all(c["ok"] for c in checks.values())
    assert sum(checks["synthesis"]["pairs"]) > 0
    assert checks["train"]["loss_first_last"][1] < checks["train"]["loss_first_last"][0]
    assert checks["train"]["profile"]["device"] == "cpu"
    assert checks["train"]["attention"] == "sdpa" and checks["train"]["attention_kernel"].startswith("flash")
    assert checks["hf_baseline"]["tokens_per_s"] > 0 and checks["hf_baseline"]["megatron_over_hf_per_device"] > 0
    assert checks["resume"]["resumed_from"] == 8 and checks["resume"]["iteration"] == 12
    assert checks["export"]["max_abs_logit_diff"] < 1e-3


def test_failed_check_is_reported_and_its_dependents_skipped(tmp_path: Path) -> None:
    from ipt_hpc import doctor as doc

    def broken(ctx):
        raise RuntimeError("no GPU here")

    original = doc.CHECKS
    doc.CHECKS = [c if c.name != "train" else doc.Check("train", c.what, broken) for c in original]
    doc.CHECKS = [c for c in doc.CHECKS if c.name in ("records", "train", "hf_baseline", "resume", "export")]
    try:
        report = doc.run(False, tmp_path / "r.json", tmp_path / "work", log=lambda m: None)
    finally:
        doc.CHECKS = original
    checks = report["checks"]
    assert not report["ok"] and checks["records"]["ok"]
    assert checks["train"]["error"] == "RuntimeError: no GPU here"
    assert checks["hf_baseline"]["skipped"] == "needs train" and checks["export"]["skipped"] == "needs resume"
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False
