"""Checkpoints: Megatron ``dist_checkpointing`` saves of model, optimizer, schedule, iteration and RNG.

Layout under ``RUN/train/checkpoints/``::

    iter_0000040/          a complete checkpoint (dist_checkpointing files + meta.json)
    iter_0000060.tmp/      being written (or torn by a kill): never loaded, removed by the next save
    latest.json            {"iteration": 40, "dir": "iter_0000040"}: written last, atomically

A save writes into ``iter_N.tmp``, then rank 0 writes ``meta.json``, renames the folder to ``iter_N`` and
only then replaces ``latest.json``. A save killed at any point leaves the previous checkpoint as the
latest complete one. The data position is the iteration itself (see :mod:`.data`), and the sharded
format lets a run resume with another data-parallel size.

With the distributed optimizer the format and strategy come from the training profile
(:mod:`.profile`): ``dp_reshardable`` saved and loaded through Megatron-Core's fully parallel
wrappers (each data-parallel rank writes and reads its own share; nothing is gathered). It resumes at
another data-parallel size, not at another TP/PP. ``fully_reshardable`` (which would) gathers every
rank's state on data-parallel rank 0 and, in megatron-core 0.16.1 without apex or Transformer Engine,
cannot be loaded (``KeyError: 'step'`` in ``_set_main_param_and_optimizer_states``), so it is not offered.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import fsync_dir, read_json, write_json_atomic
from . import early
from .profile import Profile

COMPLETE = re.compile(r"^iter_(\d{7})$")
TRACKER = "latest.json"
KILL_DURING_SAVE_ENV = "IPT_TRAIN_TEST_KILL_DURING_SAVE"  # test hook: SIGKILL rank 0 mid-save at iteration N


def iter_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def latest(root: Path) -> Path | None:
    """The latest complete checkpoint: the tracker's, else the highest complete ``iter_N`` folder."""
    tracker = root / TRACKER
    if tracker.exists():
        folder = root / read_json(tracker)["dir"]
        if (folder / "meta.json").exists():
            return folder
    complete = sorted(p for p in root.glob("iter_*") if COMPLETE.match(p.name) and (p / "meta.json").exists())
    return complete[-1] if complete else None


def _rng_state(on_gpu: bool) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if on_gpu:
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict[str, Any], on_gpu: bool) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if on_gpu and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dict(
    model: Any, optimizer: Any, scheduler: Any, iteration: int, on_gpu: bool, profile: Profile, *, loading: bool
) -> dict:
    """The sharded state dict of everything a resume needs (RNG: one object per model-parallel rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = model.module.sharded_state_dict()
    # the distributed optimizer's format (the plain optimizer ignores it): see the module docstring
    metadata = {"distrib_optim_sharding_type": profile.optim_sharding or "dp_reshardable"}
    rng = ShardedObject(
        "rng_state",
        _rng_state(on_gpu),
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "rng_state": rng,
    }


def start_writer_helper(signal_names: list[str]) -> None:
    """Start dist_checkpointing's helper process now, deaf to the stop signals, and bound to this rank's life.

    Its file writer collects results through a ``multiprocessing`` manager, a child process that it would
    start at the first save (``filesystem_async._get_write_results_queue``: a spawn-context manager's queue).
    Slurm delivers the warning signal and SIGTERM to every process of a job step, and the default action of
    both would kill that helper in the middle of the very save they ask for. Ignored signals stay ignored
    across the helper's exec, so it is started here with them ignored. Deaf to them, it would outlive a rank
    killed outright (SIGKILL): so the same manager is started here with :func:`.early.die_with_parent` as its
    initializer, and its queue is the one the writer finds.
    """
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    numbers = [getattr(signal, f"SIG{n.upper().removeprefix('SIG')}") for n in signal_names]
    previous = [signal.signal(n, signal.SIG_IGN) for n in numbers]
    try:
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=early.die_with_parent, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    finally:
        for n, handler in zip(numbers, previous, strict=True):
            signal.signal(n, handler)


def strategies(profile: Profile, folder: Path | None = None) -> tuple[Any, Any]:
    """(save, load) sharded strategies: the fully parallel wrappers over the data-parallel group, or the
    defaults (None). ``folder``: the checkpoint to load (its format picks the base load strategy)."""
    if not profile.fully_parallel_checkpoint:
        return None, None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )

    group = ps.get_data_parallel_group(with_context_parallel=True)
    save = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
    load = None
    if folder is not None:
        load = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(folder)), group)
    return save, load


def save(
    root: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    iteration: int,
    meta: dict,
    on_gpu: bool,
    profile: Profile,
) -> Path:
    """Save a complete checkpoint of ``iteration`` (all ranks call this); returns its folder."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final, tmp = iter_dir(root, iteration), root / f"iter_{iteration:07d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [tmp, final]:  # a torn save of this iteration, or one redone after a crash before the tracker
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir()
    torch.distributed.barrier()
    started = time.time()
    state = _state_dict(model, optimizer, scheduler, iteration, on_gpu, profile, loading=False)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=strategies(profile)[0])
    torch.distributed.barrier()
    if rank == 0:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(iteration):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: the files are written, the checkpoint is not complete
        write_json_atomic(
            tmp / "meta.json", {**meta, "iteration": iteration, "save_s": round(time.time() - started, 3)}
        )
        os.replace(tmp, final)
        fsync_dir(root)
        write_json_atomic(root / TRACKER, {"iteration": iteration, "dir": final.name})
    torch.distributed.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and torn ``.tmp`` folders (rank 0)."""
    if torch.distributed.get_rank() != 0:
        return
    complete = sorted(p for p in root.glob("iter_*") if COMPLETE.match(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for torn in root.glob("iter_*.tmp"):
        shutil.rmtree(torn, ignore_errors=True)


def is_model_only(folder: Path) -> bool:
    """A checkpoint with the model's weights only: ``iter_0000000`` imported from Hugging Face (:mod:`.hf_init`)."""
    return bool(read_json(folder / "meta.json").get("model_only"))


def load_model(folder: Path, model: Any) -> None:
    """Load only the weights of ``folder`` into this rank's (unwrapped) model; dist_checkpointing reshards."""
    from megatron.core import dist_checkpointing

    template = model.sharded_state_dict()
    state = dist_checkpointing.load(template, str(folder), strict="raise_unexpected")
    model.load_state_dict({k: state[k] for k in template}, strict=True)


def _parts(optimizer: Any) -> list[Any]:
    """The optimizers inside Megatron-Core's ``ChainedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _init_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer its Adam state before the load template is built.

    Without apex or Transformer Engine (plain pip installs: our dependencies), Megatron-Core's
    ``DistributedOptimizer.state_dict()`` reads each state's ``step`` and asserts there is exactly one, so
    building the template of a fresh optimizer fails (``assert len(steps) == 1``) and a resume dies before
    loading. Megatron-Core's own helper fills the state with placeholders; the load then overwrites them.
    """
    for opt in _parts(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _saved_steps(tree: Any) -> set[int]:
    """The optimizer ``step`` values of every ``param_groups`` list in a loaded optimizer state."""
    found: set[int] = set()
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "param_groups" and isinstance(value, list):
                found |= {int(g["step"]) for g in value if isinstance(g, dict) and "step" in g}
            else:
                found |= _saved_steps(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            found |= _saved_steps(value)
    return found


def _restore_adam_steps(optimizer: Any, saved: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor holding the saved step count.

    Without apex or Transformer Engine, Megatron-Core's ``DistributedOptimizer.load_state_dict`` hands one
    ``step`` tensor to the state of every parameter, then its parameter-state load copies each bucket's
    ``step`` (the template's, not the checkpoint's) over it: after a resume every parameter's bias
    correction restarted from the placeholder's step (measured: 1 instead of 3), and ``torch.optim.Adam``
    would also increment the shared tensor once per parameter. The saved count is in ``param_groups``.
    """
    steps = _saved_steps(saved)
    if len(steps) != 1:
        return  # no step recorded (the plain optimizer keeps its own per-parameter state intact)
    (step,) = steps
    for opt in _parts(optimizer):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = torch.tensor(float(step), dtype=st["step"].dtype, device=st["step"].device)


def load(folder: Path, model: Any, optimizer: Any, scheduler: Any, on_gpu: bool, profile: Profile) -> int:
    """Load a complete checkpoint into the live objects; returns its iteration."""
    from megatron.core import dist_checkpointing

    meta = read_json(folder / "meta.json")
    iteration = meta["iteration"]
    if profile.distributed_optimizer:
        _init_optimizer_state(optimizer)
    template = _state_dict(model, optimizer, scheduler, iteration, on_gpu, profile, loading=True)
    state = dist_checkpointing.load(template, str(folder), sharded_strategy=strategies(profile, folder)[1])
    model.module.load_state_dict(state["model"])
    with torch.no_grad():  # the non-apex path copies into leaf fp32 main params in place
        optimizer.load_state_dict(state["optimizer"])
    if profile.distributed_optimizer:
        _restore_adam_steps(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng_state"], on_gpu)
    return int(state["iteration"])
