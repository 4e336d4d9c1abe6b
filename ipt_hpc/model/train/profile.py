"""The training profile: every choice that differs between a GPU and a CPU run, as a function of the config.

What Megatron-Core is handed (precision, fused kernels, sequence parallelism, the layer spec, the
distributed optimizer and its checkpoint format) used to follow ``torch.cuda.is_available()``, so the GPU
configuration was never built anywhere but on a GPU, and its defects surfaced there. :func:`resolve` makes it
a pure function of ``train.*`` (plus whether Transformer Engine is importable), so a CPU test builds exactly
what a GPU rank would get and runs what gloo can run (tests/test_train_profile.py).

Choices, and why:

* ``masked_softmax_fusion`` is off: Megatron's fused softmax imports apex's ``scaled_masked_softmax_cuda``
  on the first half-precision forward with 16 < seq <= 4096, and apex is not a dependency. The unfused
  path computes the softmax in fp32 (``attention_softmax_in_fp32``).
* ``sequence_parallel`` only with the Transformer Engine spec: the local spec's ``WrappedTorchNorm``
  asserts ``not config.sequence_parallel`` when the model is built.
* ``attention`` is ``train.attention``: ``sdpa`` (default, both devices) runs PyTorch's
  ``scaled_dot_product_attention`` in the local spec (``attention.py``); ``unfused`` is Megatron-Core's
  ``DotProductAttention``, which materialises the score matrix (0.32x Hugging Face on an H200). With the
  Transformer Engine spec, TE's own fused attention runs.
* ``swiglu_fusion`` (Megatron's ``bias_activation_fusion``) and ``cross_entropy_fusion`` (its native
  ``cross_entropy_loss_fusion``) follow ``train.fusions`` (auto: on with ``device: cuda``). Neither needs a
  bias, apex or TE in megatron-core 0.16: both are ``torch.compile``d functions (SwiGLU's backward recomputes
  from the saved input, so the activation is not kept). ``rope_fusion`` (``train.rope_fusion``, auto: with
  the fusions) is ``compiled``: Megatron's eager RoPE wrapped in ``torch.compile`` (+13% tokens/s on the
  doctor's model on an H200, +10% on the 1.3B config); its own ``apply_rope_fusion`` imports TE, which
  the TE spec uses. ``gradient_accumulation_fusion`` stays off (apex's ``fused_weight_gradient_mlp_cuda``).
* The distributed optimizer saves ``dp_reshardable`` through the fully parallel save/load wrappers
  (Megatron-LM's default): every data-parallel rank writes its own shard of the optimizer state, nothing
  is gathered in the signal window, and a resume may change the data-parallel size (not TP or PP).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Literal

from ...config import TrainConfig
from ...errors import IptError

# Test hook: run the CUDA profile with its tensors on the CPU (gloo, CPU shims), so CI trains, saves and
# resumes with exactly the configuration a GPU rank gets. Never set by users.
PROFILE_ON_CPU_ENV = "IPT_TRAIN_PROFILE_ON_CPU"
PP_SEED_STRIDE = 100  # Megatron-LM: seed + 100 * pipeline rank, so pipeline stages draw different streams


@dataclass(frozen=True)
class Profile:
    device: Literal["cuda", "cpu"]
    bf16: bool
    layer_spec: Literal["local", "transformer_engine"]
    attention: Literal["sdpa", "unfused", "transformer_engine"]
    swiglu_fusion: bool
    cross_entropy_fusion: bool
    rope_fusion: Literal["off", "compiled", "transformer_engine"]
    sequence_parallel: bool
    masked_softmax_fusion: bool
    distributed_optimizer: bool
    optim_sharding: Literal["dp_reshardable"] | None
    fully_parallel_checkpoint: bool
    use_cpu_initialization: bool
    batch_p2p: bool

    def describe(self) -> dict[str, object]:
        return asdict(self)


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch module is importable (NVIDIA's containers ship it)."""
    try:
        return importlib.util.find_spec("transformer_engine.pytorch") is not None
    except (ImportError, ValueError):
        return False


def resolve(cfg: TrainConfig, *, transformer_engine: bool | None = None) -> Profile:
    """The profile of ``cfg``: what every rank builds, whatever machine computes it."""
    cuda = cfg.device == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    te = te_available() if transformer_engine is None else transformer_engine
    if cfg.layer_spec == "transformer_engine" and not te:
        raise IptError("train.layer_spec=transformer_engine, but transformer_engine is not importable here")
    use_te = cfg.layer_spec == "transformer_engine" or (cfg.layer_spec == "auto" and te)
    spec = "transformer_engine" if use_te else "local"
    if spec == "transformer_engine" and not cuda:
        raise IptError("train.layer_spec: Transformer Engine runs on CUDA only; use train.layer_spec=local on CPU")
    distributed = cfg.distributed_optimizer == "on" or (cfg.distributed_optimizer == "auto" and cuda)
    fused = cfg.fusions == "on" or (cfg.fusions == "auto" and cuda)
    te_spec = spec == "transformer_engine"
    return Profile(
        device=cfg.device,
        bf16=bf16,
        layer_spec=spec,
        attention="transformer_engine" if te_spec else cfg.attention,
        swiglu_fusion=fused,
        cross_entropy_fusion=fused,
        rope_fusion=_rope(cfg.rope_fusion, fused, te_spec),
        sequence_parallel=cfg.tensor_parallel > 1 and spec == "transformer_engine",
        masked_softmax_fusion=False,
        distributed_optimizer=distributed,
        optim_sharding="dp_reshardable" if distributed else None,
        fully_parallel_checkpoint=distributed,
        # CPU: identical full weights at any TP size (tests compare TP=1 with TP=2)
        use_cpu_initialization=not cuda,
        batch_p2p=cuda,
    )


def _rope(setting: str, fused: bool, te_spec: bool) -> Literal["off", "compiled", "transformer_engine"]:
    """RoPE's kernel: TE's fused one with the TE spec, else Megatron's eager one compiled (or not)."""
    if setting == "off" or (setting == "auto" and not fused):
        return "off"
    return "transformer_engine" if te_spec else "compiled"


def placement(profile: Profile) -> Literal["cuda", "cpu"]:
    """Where this process puts its tensors; a CUDA profile on a node without CUDA is an error."""
    import torch

    if profile.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get(PROFILE_ON_CPU_ENV) == "1":
        return "cpu"
    host = os.uname().nodename
    raise IptError(
        f"train: train.device=cuda, but {host} has no CUDA device"
        f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!s}). On Slurm, request GPUs"
        " (execution.slurm.gpus_per_node); to train on CPUs on purpose, set train.device=cpu"
    )


def rank_seed(seed: int, pipeline_rank: int) -> int:
    """The model-parallel RNG seed of a pipeline stage (Megatron-LM's offset)."""
    return seed + PP_SEED_STRIDE * pipeline_rank


def cpu_profile(cfg: TrainConfig, *, bf16: bool) -> Profile:
    """The profile of a one-process CPU model (export, the Hugging Face import): local spec, no DDP sharding."""
    precision = "bf16" if bf16 else "fp32"
    update = {
        "device": "cpu",
        "precision": precision,
        "layer_spec": "local",
        "distributed_optimizer": "off",
        "fusions": "off",  # one forward: torch.compile's start-up would cost more than it saves
        "rope_fusion": "off",
    }
    return resolve(cfg.model_copy(update=update), transformer_engine=False)


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank runs: its host, global and node-local rank, and the CUDA device the GPU path gives it.

    ``cuda_device`` is what ``torch.cuda.set_device`` gets on a GPU node; a CPU rank records it too, so the
    GPU path's per-node choice is visible (and tested) without a GPU."""

    host: str
    rank: int
    local_rank: int
    world_size: int
    cuda_device: str

    def describe(self) -> dict[str, object]:
        return asdict(self)


def rank_placement(env: dict[str, str] | os._Environ[str], visible_gpus: int | None) -> RankPlacement:
    """This rank's place, from torchrun's (RANK, LOCAL_RANK, WORLD_SIZE) or srun's environment (SLURM_PROCID,
    SLURM_LOCALID, SLURM_NTASKS). The GPU index is the **node-local** rank, never the global one: rank 2 of a
    2-GPU-per-node job is local rank 0 on the second node and takes ``cuda:0`` there. Where the task sees
    exactly one GPU (Slurm's per-task binding, ``--gpus-per-task=1``) it is ``cuda:0``. ``visible_gpus``:
    the CUDA devices this process sees (None on a CPU rank: not checked)."""
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    index = 0 if visible_gpus == 1 else local_rank
    if visible_gpus is not None and index >= visible_gpus:
        raise IptError(
            f"train: rank {rank} is local rank {local_rank} on {os.uname().nodename}, which has {visible_gpus} visible"
            f" CUDA device(s) (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank per"
            " GPU (train.ranks_per_node <= GPUs per node)"
        )
    return RankPlacement(os.uname().nodename, rank, local_rank, world, f"cuda:{index}")
