"""The train stage on CPU (gloo, torchrun): a tiny Llama-style model learns; TP=2 and PP=2 reproduce TP=1/PP=1
losses; the warning signal stops every rank at one step with a checkpoint and the resumed run repeats the
uninterrupted losses step for step (also at another data-parallel size); a save torn by SIGKILL is skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ipt_hpc.atomic import read_json, write_json_atomic
from ipt_hpc.config import load_config
from ipt_hpc.errors import ConfigError, IptError
from ipt_hpc.indexed import IndexedWriter
from ipt_hpc.model.train.metrics import read_steps
from ipt_hpc.model.train.stage import free_port

pytestmark = pytest.mark.train  # starts training runs: not in make test-fast

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
ITERS = 24
SMALL = [  # smaller than configs/train/tiny.yaml: the suite runs on 2 shared cores
    "train.model.hidden_size=32",
    "train.model.ffn_hidden_size=64",
    f"train.train_iters={ITERS}",
    "train.seq_length=32",
    "train.micro_batch_size=2",
    "train.lr=0.01",
    "train.min_lr=0.001",
    "train.save_interval=4",
    "train.keep_checkpoints=3",
    "train.data.groups={augmented: 0.7, raw: 0.3}",
]
EOD = 1


def make_tokens(run: Path) -> None:
    """Two learnable groups (short periodic token patterns) as real indexed datasets with manifests."""
    rng = np.random.default_rng(0)
    for group, n in (("augmented", 400), ("raw", 300)):
        writer = IndexedWriter(run / "tokens" / group, np.uint16)
        docs = []
        for _ in range(n):
            start, period, length = int(rng.integers(2, 200)), int(rng.integers(3, 8)), int(rng.integers(20, 90))
            docs.append([(start + (k % period) * 7) % 250 + 2 for k in range(length)] + [EOD])
        writer.add(np.concatenate([np.array(d) for d in docs]), np.array([len(d) for d in docs]))
        writer.close()
        write_json_atomic(run / "tokens" / group / "manifest.json", {"config": {"eod_id": EOD}})


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep carried wheels
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
    env.pop("IPT_TRAIN_TEST_STEP_SLEEP", None)
    env.update(extra)
    return env


def start(run: Path, nproc: int, *sets: str, **env: str) -> subprocess.Popen[str]:
    """torchrun with ``nproc`` ranks of ``python -m ipt_hpc.model.train`` (gloo), output kept in RUN/torchrun-*.log."""
    log = open(run / f"torchrun-{time.time_ns()}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    cmd += ["-m", "ipt_hpc.model.train", str(run), "--config", str(TINY)]
    for s in [*SMALL, *sets]:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env=_env(**env), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=run)


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> int:
    rc = proc.wait(timeout=timeout)
    proc.stdout and proc.stdout.close()
    return rc


def losses(run: Path) -> list[float]:
    steps = read_steps(run / "train" / "log.jsonl")
    return [steps[i]["loss"] for i in range(1, max(steps) + 1)]


def events(run: Path) -> list[dict]:
    lines = (run / "train" / "log.jsonl").read_text().splitlines()
    return [r for r in map(__import__("json").loads, lines) if r["kind"] == "event"]


def tail(run: Path) -> str:
    logs = sorted(run.glob("torchrun-*.log"))
    return logs[-1].read_text()[-3000:] if logs else ""


def new_run(tmp: Path, name: str) -> Path:
    run = tmp / name
    make_tokens(run)
    return run


def ranks(proc: subprocess.Popen[str]) -> dict[int, int]:
    """pid of each training rank under torchrun, by RANK."""
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            # torchrun's own children, not a rank's helpers (dist_checkpointing's writer: same command line and RANK)
            if child.ppid() == proc.pid and "ipt_hpc.model.train" in " ".join(child.cmdline()):
                found[int(child.environ()["RANK"])] = child.pid
        except (psutil.Error, KeyError):
            continue
    return found


def wait_for_step(run: Path, iteration: int, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    log = run / "train" / "log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{tail(run)}")
        if log.exists() and read_steps(log) and max(read_steps(log)) >= iteration:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {iteration} after {timeout} s:\n{tail(run)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted TP=1 PP=1 DP=1 run, started through the CLI (launch train, local executor)."""
    run = new_run(tmp_path_factory.mktemp("train"), "ref")
    cmd = [sys.executable, "-m", "ipt_hpc.launch", "train", "--config", str(TINY), "--run", str(run)]
    for s in SMALL:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def test_tiny_model_learns_and_logs(reference: Path) -> None:
    loss = losses(reference)
    assert len(loss) == ITERS
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 0.5, loss  # ln(256) = 5.5 at the start
    step = read_steps(reference / "train" / "log.jsonl")[ITERS]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_s"} <= step.keys()
    assert step["lr"] == pytest.approx(0.001)  # cosine decayed to min_lr
    assert (reference / "train" / "loss.png").stat().st_size > 1000
    assert read_json(reference / "train" / "done.json")["iteration"] == ITERS
    ckpts = sorted(p.name for p in (reference / "train" / "checkpoints").iterdir())
    assert ckpts == ["iter_0000016", "iter_0000020", "iter_0000024", "latest.json"]  # keep_checkpoints=3
    start_event = events(reference)[0]
    assert start_event["profile"]["attention"] == "sdpa"  # the default, on CPU too
    assert start_event["attention_kernel"] == "flash (native GQA)"  # what PyTorch dispatches fp32 GQA to on CPU


def test_unfused_attention_trains_to_the_same_losses(tmp_path: Path, reference: Path) -> None:
    """``train.attention=unfused`` (Megatron-Core's DotProductAttention) against the SDPA default through the
    real loop, step for step; the run also skips its final save and profiles one step."""
    run = new_run(tmp_path, "unfused")
    sets = ("train.attention=unfused", "train.final_save=false", "train.torch_profile_step=3")
    assert finish(start(run, 1, *sets)) == 0, tail(run)
    assert events(run)[0]["profile"]["attention"] == "unfused" and events(run)[0]["attention_kernel"] is None
    np.testing.assert_allclose(losses(run), losses(reference), rtol=0, atol=1e-5)
    ckpts = sorted(p.name for p in (run / "train" / "checkpoints").iterdir())
    assert ckpts == ["iter_0000012", "iter_0000016", "iter_0000020", "latest.json"]  # no iter_0000024
    assert read_json(run / "train" / "done.json") == {"iteration": ITERS, "checkpoint": None}
    top = read_json(run / "train" / "torch-profile-3.json")["top"]
    assert top and any(k["name"] == "aten::bmm" for k in top)  # the unfused scores and context products
    assert "Self CPU" in (run / "train" / "torch-profile-3.txt").read_text()


@pytest.mark.parametrize("parallel", ["train.tensor_parallel=2", "train.pipeline_parallel=2"])
def test_tp2_and_pp2_match_single_rank_losses(tmp_path: Path, reference: Path, parallel: str) -> None:
    run = new_run(tmp_path, "par")
    assert finish(start(run, 2, parallel)) == 0, tail(run)
    np.testing.assert_allclose(losses(run), losses(reference), rtol=0, atol=2e-5)
    assert events(run)[0]["dp"] == 1


def test_warning_signal_saves_and_resume_repeats_losses_step_for_step(tmp_path: Path, reference: Path) -> None:
    run = new_run(tmp_path, "sig")
    proc = start(run, 1, IPT_TRAIN_TEST_STEP_SLEEP="0.3")
    wait_for_step(run, 6, proc)
    os.kill(ranks(proc)[0], signal.SIGUSR1)
    finish(proc)
    stop = events(run)[-1]
    assert stop["event"] == "exit" and stop["reason"] == "SIGUSR1" and 6 <= stop["iteration"] < ITERS, events(run)
    assert read_json(run / "train" / "checkpoints" / "latest.json")["iteration"] == stop["iteration"]
    assert finish(start(run, 1)) == 0, tail(run)
    assert [e["iteration"] for e in events(run) if e["event"] == "resume"] == [stop["iteration"]]
    assert losses(run) == losses(reference)  # bit for bit


def test_signal_to_one_rank_stops_all_and_resumes_at_another_dp_size(tmp_path: Path, reference: Path) -> None:
    run = new_run(tmp_path, "dp")
    proc = start(run, 2, IPT_TRAIN_TEST_STEP_SLEEP="0.3")  # DP=2
    wait_for_step(run, 5, proc)
    os.kill(ranks(proc)[1], signal.SIGTERM)  # only rank 1 hears it; rank 0 learns it through the all-reduce
    finish(proc)
    stop = events(run)[-1]
    assert stop["event"] == "exit" and stop["iteration"] < ITERS, events(run)
    meta = read_json(run / "train" / "checkpoints" / f"iter_{stop['iteration']:07d}" / "meta.json")
    assert meta["dp"] == 2
    assert finish(start(run, 1)) == 0, tail(run)  # resumed at DP=1
    np.testing.assert_allclose(losses(run), losses(reference), rtol=0, atol=2e-5)


def survivors(folder: Path, timeout: float = 15) -> list[str]:
    """Processes still running in ``folder`` (their working directory) after ``timeout`` seconds."""
    import psutil

    deadline, found = time.time() + timeout, []
    while time.time() < deadline:
        found = []
        for p in psutil.process_iter(["pid", "cwd", "cmdline"]):
            if p.info["cwd"] == str(folder) and p.pid != os.getpid():
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:200]}")
        if not found:
            return []
        time.sleep(0.2)
    return found


def test_checkpoint_torn_by_sigkill_is_skipped_on_resume(tmp_path: Path, reference: Path) -> None:
    run = new_run(tmp_path, "torn")
    ckpts = run / "train" / "checkpoints"
    assert finish(start(run, 1, IPT_TRAIN_TEST_KILL_DURING_SAVE="8")) != 0
    # the rank died of SIGKILL mid-save: its checkpoint helper (deaf to SIGTERM on purpose) and multiprocessing's
    # resource tracker used to live on with parent 1 (issue 28); they must die with it
    assert survivors(run) == []
    assert (ckpts / "iter_0000008.tmp" / "common.pt").exists()  # written, never completed
    assert not (ckpts / "iter_0000008").exists()
    assert read_json(ckpts / "latest.json")["iteration"] == 4
    assert finish(start(run, 1)) == 0, tail(run)
    assert [e["iteration"] for e in events(run) if e["event"] == "resume"] == [4]
    assert losses(run) == losses(reference)
    assert not list(ckpts.glob("*.tmp"))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tensor_parallel"):
        load_config(TINY, ["train.tensor_parallel=3"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(TINY, ["train.lr=fast"])
    from ipt_hpc.model.train.data import group_prefixes

    with pytest.raises(IptError, match="tokenize and merge group 'augmented'"):
        group_prefixes(load_config(TINY).train, tmp_path)


def test_slurm_dry_run_prints_a_quoted_multi_node_script(tmp_path: Path) -> None:
    run = tmp_path / "run $(touch pwned) 'q'"
    cmd = [sys.executable, "-m", "ipt_hpc.launch", "train", "--config", str(TINY), "--run", str(run)]
    cmd += ["--executor", "slurm", "--nodes", "4", "--ranks-per-node", "8", "--signal", "USR2", "--dry-run"]
    cmd += ["--set", "execution.slurm.gpus_per_node=8", "--set", "train.tensor_parallel=2"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue"):
        assert line in script
    assert "#SBATCH --signal=B:USR2@120" in script and "export IPT_TRAIN_SIGNAL=USR2" in script
    assert "scontrol show hostnames" in script and "srun" in script and "NCCL" in script
    listed = subprocess.run(
        ["bash", "-c", script.split("set -uo pipefail")[0] + 'printf "%s\\n" "$@"'],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.splitlines()
    assert listed[0] == str(run.resolve()) and listed[1] == "--config"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.gpu
def test_distributed_optimizer_checkpoint_resumes_exactly_on_gpu(tmp_path: Path) -> None:
    """GPU only (not run here): bf16 + distributed optimizer; a resume from a saved checkpoint repeats the losses."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n = min(2, torch.cuda.device_count())
    gpu = ("train.device=cuda", "train.distributed_optimizer=on", "train.precision=bf16")
    ref = new_run(tmp_path, "gpu-ref")
    assert finish(start(ref, n, *gpu)) == 0, tail(ref)
    run = new_run(tmp_path, "gpu")
    proc = start(run, n, *gpu, IPT_TRAIN_TEST_STEP_SLEEP="0.3")
    wait_for_step(run, 6, proc)
    for pid in ranks(proc).values():
        os.kill(pid, signal.SIGUSR1)
    finish(proc)
    assert events(run)[-1]["event"] == "exit", tail(run)
    assert finish(start(run, n, *gpu)) == 0, tail(run)
    assert losses(run) == losses(ref)


def test_a_warning_signal_during_startup_is_kept_not_fatal(tmp_path: Path) -> None:
    """USR1 while the rank still imports torch and Megatron-Core (seconds, before the loop's handlers):
    the rank must not die of it but save and exit 75 at its first step, so Slurm requeues the job."""
    run = new_run(tmp_path, "early")
    cmd = [sys.executable, "-m", "ipt_hpc.model.train", str(run), "--config", str(TINY)]
    for s in SMALL:
        cmd += ["--set", s]
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run)
    time.sleep(0.5)  # Python is up, torch is being imported
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-3000:]
    stopped = next(e for e in events(run) if e["event"] == "exit")
    assert stopped["reason"] == "SIGUSR1" and stopped["iteration"] == 1
