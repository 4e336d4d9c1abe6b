"""The demo pipeline on the real local Slurm cluster (tools/local-slurm up), once undisturbed and once
under a chaos drill (tests/chaos.py): tasks SIGKILLed, requeued and sent the warning signal, the node
set DOWN and back. Slurm requeues what it can; what it cannot (a task killed outright fails, and its
failure cancels the rest of the chain) is completed by the resume command ``status`` prints
(``--shards failed``) and a rerun of the pipeline. The outputs must equal the undisturbed run's byte
for byte, and the training losses step for step."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from chaos import Chaos
from conftest import run_cli
from test_failures import demo_sets
from test_local_slurm import slurm_cluster  # noqa: F401 - module fixture: skip/fail without a cluster

from ipt_hpc.atomic import read_json
from ipt_hpc.model.train.metrics import read_steps
from ipt_hpc.status import run_status

pytestmark = pytest.mark.slurm

SLURM = ["--executor", "slurm", "--set", "execution.slurm.time_min=20"]
EVERY_STEP = ["--set", "train.log_interval=1"]  # every step's loss in train/log.jsonl


def pipeline(run: Path, model: Path, *, wait: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("pipeline", "--run", str(run), *demo_sets(model), *SLURM, *EVERY_STEP, *(["--wait"] if wait else []))


def ours_in_queue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=60).stdout
    return [line for line in out.splitlines() if " ipt-" in line]


def settle(node: str, timeout: float = 900) -> Counter[str]:
    """Wait until none of our jobs is queued, doing what an operator would: release the jobs Slurm holds
    (a requeue whose launch failed) and resume the node if Slurm drained it (a relaunch that met its
    own earlier instance: "Duplicate jobid"). Returns how often each was needed."""
    done: Counter[str] = Counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True).stdout
        if any(word in state for word in ("drain", "down", "drng")):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
            done["node resumed"] += 1
        out = subprocess.run(["squeue", "-h", "-o", "%i %j %r"], capture_output=True, text=True, timeout=60).stdout
        jobs = [line.split(maxsplit=2) for line in out.splitlines() if " ipt-" in line]
        if not jobs:
            return done
        for job in jobs:
            if len(job) == 3 and "held" in job[2].lower():
                subprocess.run(["scontrol", "release", job[0]], capture_output=True, timeout=60, check=False)
                done["job released"] += 1
        time.sleep(2)
    raise AssertionError(f"jobs still queued after {timeout} s:\n" + "\n".join(ours_in_queue()))


def digest(run: Path) -> dict[str, str]:
    """sha256 of every shard and token file of a run, and its training losses step by step."""
    files = [
        *sorted(run.glob("raw/shard-*")),
        *sorted(run.glob("synth/shard-*")),
        *sorted(run.glob("augmented/shard-*")),
        *sorted(run.glob("tokens/*.bin")),
        *sorted(run.glob("tokens/*.idx")),
        *sorted(run.glob("tokens/*/shard-*")),
    ]
    out = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for step, rec in read_steps(run / "train" / "log.jsonl").items():
        out[f"loss@{step}"] = repr(rec["loss"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_synth: Path) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    started = time.time()
    proc = pipeline(run, tiny_synth)
    queue = "\n".join(ours_in_queue())
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nqueue:\n{queue}"
    print(f"reference pipeline on Slurm: {time.time() - started:.0f} s")
    return run


def test_whole_pipeline_through_slurm_arrays_and_dependencies(reference: Path) -> None:
    """The demo config end to end on the local cluster: arrays per stage, afterok chains, one job each for
    the coordinators, training, export, eval and the report (a tiny random synthesizer keeps it short)."""
    run = reference
    for path in ("tokens/augmented.bin", "tokens/raw.bin", "mixture.json", "train/done.json", "hf/config.json"):
        assert (run / path).exists(), path
    pipelines = sorted((run / "_state").glob("pipeline-*.json"))
    steps = read_json(pipelines[-1])["steps"]
    assert [s["step"] for s in steps][:8] == [
        "shard", "decontaminate-index", "decontaminate raw-clean", "synthesize", "decontaminate synth-clean",
        "templify", "tokenize augmented", "tokenize raw",
    ]  # fmt: skip
    assert all(s["dependency"].startswith("afterok:") for s in steps[1:])
    assert read_json(run / "eval" / "demo.json")["results"]["demo_mc"]
    text = (run / "report" / "report.md").read_text()
    assert "## Training" in text and "## Evaluation" in text and "## Mixture" in text
    assert len(read_steps(run / "train" / "log.jsonl")) == 12


def test_chaos_drill_ends_with_the_undisturbed_bytes_and_losses(
    reference: Path, tiny_synth: Path, tmp_path: Path
) -> None:
    # the default partition's node (tools/local-slurm up --nodes N adds partition "nodes": not this drill's)
    parts = subprocess.run(["sinfo", "-h", "-o", "%P %N"], capture_output=True, text=True).stdout.splitlines()
    node = next(line.split()[1] for line in parts if line.split()[0].endswith("*"))
    run = tmp_path / "run"
    chaos = Chaos(node=node, seed=7, max_actions=16, max_kills=2).start()
    rounds: list[str] = []
    operator: Counter[str] = Counter()
    done = run / "report" / "report.md"  # the last step: it exists once the whole chain has completed
    try:
        # submitted without --wait: waiting is settle()'s, which also does an operator's part (a drained
        # node, a held job) while it waits; a --wait would sit behind a drained node until its timeout
        proc = pipeline(run, tiny_synth, wait=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for _ in range(6):  # what Slurm could not recover: the resume command status prints, then the pipeline
            operator += settle(node)
            if done.exists():
                break
            root = run_status(run)["root_cause"]
            if root:
                command = root["resume"].split(" (with")[0].split()[3:]  # after "python -m ipt_hpc.launch"
                resumed = run_cli(*command, *demo_sets(tiny_synth), *SLURM, *EVERY_STEP)
                rounds.append(f"{' '.join(command[:1] + command[-2:])}: rc {resumed.returncode}")
                operator += settle(node)
            proc = pipeline(run, tiny_synth, wait=False)
            rounds.append(f"pipeline resubmitted: rc {proc.returncode}")
    finally:
        chaos.stop()
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True, check=False)
    summary = f"chaos: {dict(chaos.counts)}; targets: {dict(Counter(chaos.stages))}; rounds: {rounds};"
    summary += f" operator: {dict(operator)}\n"
    summary += "\n".join(chaos.log)
    print(summary)
    assert done.exists(), f"{summary}\n{proc.stderr[-3000:]}"
    assert chaos.counts["stopped_after"] >= 4, summary  # the drill did hit running tasks
    ours, ref = digest(run), digest(reference)
    assert sorted(ours) == sorted(ref)
    differ = [k for k in ref if ours[k] != ref[k]]
    assert not differ, f"differ from the undisturbed run: {differ}\n{summary}"
