"""The GPU training profile, built and run on CPU: what a GPU rank hands Megatron-Core (bf16 params, fusion
flags, sequence parallelism, the distributed optimizer and its checkpoint format) comes from the config, so
these tests train, save and resume with exactly that configuration through the real ``python -m
ipt_hpc.model.train`` (gloo, the CPU shims; only the tensors' placement differs, via the test hook).

Reintroducing ``masked_softmax_fusion`` (apex's ``scaled_masked_softmax_cuda`` on the first bf16 forward)
or sequence parallelism with the local spec (``WrappedTorchNorm``'s assert) fails the training test here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import REPO, TINY, _env, events, finish, losses, new_run, ranks, start, tail, wait_for_step

from ipt_hpc.atomic import read_json
from ipt_hpc.config import load_config
from ipt_hpc.errors import IptError
from ipt_hpc.model.train.profile import PROFILE_ON_CPU_ENV, rank_placement, rank_seed, resolve

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.train  # starts training runs: not in make test-fast

GPU_CONFIGS = ["instructlm-500m.yaml", "instructlm-1.3b.yaml", "continual-llama.yaml"]
# the GPU profile at TP=2 x DP=2; seq 32, 2 heads per TP rank and micro-batch 2 meet every condition under
# which Megatron's fused softmax would take apex's kernel (16 < seq <= 4096, seq % 4, batch x heads % 4)
GPU_RUN = [
    "train.device=cuda",
    "train.tensor_parallel=2",
    "train.model.hidden_size=32",
    "train.model.ffn_hidden_size=64",
    "train.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.train_iters=6",
    "train.lr_warmup_iters=1",
    "train.save_interval=2",
    "train.keep_checkpoints=5",
]


def train_gpu_profile(run: Path, nproc: int, *sets: str, **env: str) -> subprocess.Popen[str]:
    """test_train's launcher with the GPU profile's settings, its tensors on the CPU (the test hook)."""
    return start(run, nproc, *GPU_RUN, *sets, **{PROFILE_ON_CPU_ENV: "1", **env})


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_resolve_to_kernels_we_ship(name: str) -> None:
    cfg = load_config(REPO / "configs" / "train" / name).train
    assert cfg.device == "cuda"
    local = resolve(cfg, transformer_engine=False)
    assert local.bf16 and local.layer_spec == "local"
    assert not local.masked_softmax_fusion  # apex is not a dependency
    assert not local.sequence_parallel  # WrappedTorchNorm asserts against it
    assert local.distributed_optimizer and local.optim_sharding == "dp_reshardable" and local.fully_parallel_checkpoint
    assert local.attention == "sdpa" and local.swiglu_fusion and local.cross_entropy_fusion
    assert local.rope_fusion == "compiled"
    auto = resolve(cfg.model_copy(update={"layer_spec": "auto"}), transformer_engine=True)
    assert auto.layer_spec == "transformer_engine"
    assert auto.sequence_parallel == (cfg.tensor_parallel > 1)


def test_layer_spec_and_device_errors_name_the_key() -> None:
    cfg = load_config(TINY).train
    assert cfg.device == "cpu" and not resolve(cfg).bf16 and not resolve(cfg).distributed_optimizer
    with pytest.raises(IptError, match="transformer_engine is not importable"):
        resolve(cfg.model_copy(update={"layer_spec": "transformer_engine"}), transformer_engine=False)
    with pytest.raises(IptError, match="CUDA only"):
        resolve(cfg.model_copy(update={"layer_spec": "transformer_engine"}), transformer_engine=True)


def test_pipeline_stages_seed_their_own_streams() -> None:
    seeds = [rank_seed(1234, pp) for pp in range(4)]
    assert seeds == [1234, 1334, 1434, 1534]  # Megatron-LM's seed + 100 * pipeline rank


def test_cuda_device_on_a_node_without_cuda_is_one_clear_error(tmp_path: Path) -> None:
    run = new_run(tmp_path, "nocuda")
    env = _env()
    env.pop(PROFILE_ON_CPU_ENV, None)
    cmd = [sys.executable, "-m", "ipt_hpc.model.train", str(run), "--config", str(TINY), "--set", "train.device=cuda"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=run)
    assert proc.returncode == 2
    assert "has no CUDA device" in proc.stderr and "train.device=cpu" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "train" / "checkpoints").exists()


@pytest.mark.slow
def test_gpu_profile_trains_saves_and_resumes_exactly_on_cpu(tmp_path: Path) -> None:
    ref = new_run(tmp_path, "ref")
    assert finish(train_gpu_profile(ref, 4), timeout=600) == 0, tail(ref)
    start = next(e for e in events(ref) if e["event"] == "start")
    profile = start["profile"]
    assert profile["device"] == "cuda" and profile["bf16"] and profile["distributed_optimizer"]
    assert profile["optim_sharding"] == "dp_reshardable" and not profile["masked_softmax_fusion"]
    # SDPA, the SwiGLU and cross-entropy fusions and the compiled RoPE: a GPU rank's kernels, compiled for the CPU
    assert profile["attention"] == "sdpa" and profile["swiglu_fusion"] and profile["cross_entropy_fusion"]
    assert profile["rope_fusion"] == "compiled" and start["attention_kernel"] == "flash (native GQA)"
    assert (start["tp"], start["dp"]) == (2, 2)
    assert np.isfinite(losses(ref)).all() and len(losses(ref)) == 6

    from megatron.core import dist_checkpointing

    final = ref / "train" / "checkpoints" / "iter_0000006"
    assert read_json(final / "meta.json")["optim_sharding"] == "dp_reshardable"
    meta = dist_checkpointing.load_tensors_metadata(str(final))
    assert str(meta["embedding.word_embeddings.weight"].dtype) == "torch.bfloat16"

    # stopped by the warning signal, resumed with the same layout: the same losses, bit for bit
    run = new_run(tmp_path, "sig")
    proc = train_gpu_profile(run, 4, IPT_TRAIN_TEST_STEP_SLEEP="0.5")
    wait_for_step(run, 2, proc, timeout=600)
    os.kill(ranks(proc)[3], signal.SIGUSR1)
    finish(proc, timeout=600)
    stop = events(run)[-1]
    assert stop["event"] == "exit" and 2 <= stop["iteration"] < 6, events(run)
    ckpts = run / "train" / "checkpoints"
    subprocess.run(["cp", "-a", str(run), str(tmp_path / "dp1")], check=True)
    assert finish(train_gpu_profile(run, 4), timeout=600) == 0, tail(run)
    assert [e["iteration"] for e in events(run) if e["event"] == "resume"] == [stop["iteration"]]
    assert losses(run) == losses(ref)
    assert read_json(ckpts / "latest.json")["iteration"] == 6

    # dp_reshardable: the same checkpoint resumes at another data-parallel size (TP=2 x DP=1)
    dp1 = tmp_path / "dp1"
    assert finish(train_gpu_profile(dp1, 2), timeout=600) == 0, tail(dp1)
    resumed = next(e for e in events(dp1) if e["event"] == "resume")
    assert (resumed["iteration"], resumed["dp"]) == (stop["iteration"], 1)
    np.testing.assert_allclose(losses(dp1), losses(ref), rtol=2e-2)


def test_slurm_training_job_asks_one_gpu_per_rank(tmp_path: Path) -> None:
    from conftest import run_cli

    base = ["train", "--config", str(TINY), "--run", str(tmp_path / "run"), "--executor", "slurm", "--dry-run"]
    base += ["--set", "train.device=cuda", "--set", "train.ranks_per_node=4"]
    proc = run_cli(*base)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=4" in proc.stdout and "#SBATCH --ntasks-per-node=4" in proc.stdout
    short = run_cli(*base, "--set", "execution.slurm.gpus_per_node=2")
    assert short.returncode != 0 and "Traceback" not in short.stderr
    assert "gpus_per_node=2 is fewer than train.ranks_per_node=4" in short.stderr
    cpu = run_cli(*base, "--set", "train.device=cpu")
    assert cpu.returncode == 0 and "gpus-per-node" not in cpu.stdout


def test_local_training_with_cuda_device_stops_before_torchrun(tmp_path: Path) -> None:
    from conftest import run_cli

    run = new_run(tmp_path, "local")
    proc = run_cli("train", "--config", str(TINY), "--run", str(run), "--set", "train.device=cuda")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "CUDA device(s)" in proc.stderr and "train.device=cpu" in proc.stderr
    assert not (run / "train" / "log.jsonl").exists()


@pytest.mark.parametrize(
    ("env", "gpus", "device"),
    [
        ({"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}, 2, "cuda:0"),  # second host, first GPU
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, 2, "cuda:1"),
        ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "9"}, 4, "cuda:1"),  # torchrun's wins
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, 1, "cuda:0"),  # one GPU bound per task
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, None, "cuda:1"),  # CPU rank: recorded
    ],
)
def test_a_rank_takes_the_gpu_of_its_local_rank_never_its_global_rank(env: dict, gpus: int | None, device: str) -> None:
    where = rank_placement(env, gpus)
    assert where.cuda_device == device
    assert where.rank == int(env.get("RANK", env.get("SLURM_PROCID")))
    assert where.host == os.uname().nodename


def test_more_local_ranks_than_gpus_is_one_clear_error() -> None:
    env = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(
        IptError, match=r"rank 6 is local rank 2 .* 2 visible CUDA device\(s\) \(CUDA_VISIBLE_DEVICES=0,1\)"
    ):
        rank_placement(env, 2)
