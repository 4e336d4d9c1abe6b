"""Make Megatron-Core run on CPU (gloo) for CI: six narrow shims, applied only when CUDA is absent.

Megatron-Core is GPU-first: a few of its modules create tensors with ``device="cuda"``, ask
``torch.cuda.current_device()``, call ``torch.cuda.synchronize()`` or compare ``tensor.type()`` with a
``torch.cuda.*`` name. On a machine without CUDA, :func:`apply` makes exactly those call sites work:

* S1 ``torch.cuda.current_device()`` answers ``"cpu"`` (RoPE, DDP buffers, p2p shapes);
* S2 the CUDA RNG tracker's ``fork()`` is a null context (attention dropout region);
* S3 ``device="cuda"`` tensors land on the CPU, and ``Tensor.cuda()`` returns the tensor itself
  (optimizer, grad clipping, multi-tensor L2 norm, pipeline schedules);
* S4 ``Tensor.type()`` (no argument) answers with the ``torch.cuda.*`` name for CPU tensors
  (grad clipping's assert, the optimizers' parameter checks);
* S5 ``torch.cuda.synchronize()`` is a no-op (p2p communication, dist_checkpointing's async writer);
* S6 ``ShardedTensor.init_data("cuda")`` allocates on the CPU (the fully parallel load's exchange of
  the distributed optimizer's shards; its ``init_fn=torch.empty`` default is bound at import, out of S3's reach).

S1, S3 (factories) and S5 are narrow: the named Megatron modules see a ``torch`` whose ``cuda``
namespace and factory functions are CPU-friendly; the real ``torch`` module is untouched. S3's
``Tensor.cuda`` and S4's ``Tensor.type`` are tensor methods, so they are patched on ``torch.Tensor``
(only in a process without CUDA, i.e. the CPU training ranks). Nothing happens when CUDA is present.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

# Megatron-Core modules whose module-level ``torch`` is swapped for the CPU-friendly view (S1, S3, S5).
MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",  # the distributed optimizer's parallel load
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.utils",  # the default causal mask (no mask passed)
)
FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like", "ones_like")
_applied = False


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _factory(fn: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return make


class _CpuCuda:
    """``torch.cuda`` as the shimmed modules see it: current device "cpu", synchronize does nothing."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:  # S1
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:  # S5
        return None


class _CpuTorch(types.ModuleType):
    """``torch`` as the shimmed modules see it: everything is the real torch except ``cuda`` and the
    tensor factories, which put ``device="cuda"`` tensors on the CPU (S3)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cuda_name(tensor_type: Any) -> Any:
    original = tensor_type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)  # S4
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def apply() -> bool:
    """Install the shims when CUDA is absent (idempotent); returns whether they are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    view = _CpuTorch()
    for name in MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = view
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # S3: Tensor.cuda() is a no-op
    torch.Tensor.type = _cuda_name(torch.Tensor.type)  # S4

    from megatron.core.tensor_parallel import random as mp_random

    mp_random.CudaRNGStatesTracker.fork = lambda self, name="model-parallel-rng": contextlib.nullcontext()  # S2

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    init_data = ShardedTensor.init_data
    ShardedTensor.init_data = lambda self, device, *a, **kw: init_data(self, _cpu_device(device), *a, **kw)  # S6
    _applied = True
    return True
