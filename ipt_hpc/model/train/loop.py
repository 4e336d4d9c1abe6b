"""The training loop, top to bottom: one process per rank (torchrun locally, srun on Slurm).

    setup -> model + DDP + optimizer + schedule -> resume -> for each step: forward/backward over the
    micro-batches (pipelined when PP > 1), optimizer step, log; stop on a signal or the time budget.

Preemption protocol: the warning signal (``train.exit_signal``, e.g. USR1 from ``sbatch --signal``) and
SIGTERM only set a flag. After every step all ranks all-reduce the flag (MAX), so they agree on the step
at which to stop; then they save a complete checkpoint and exit with :data:`EXIT_RESUME` (the Slurm
script requeues the job on that code). A restarted job resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ...atomic import write_json_atomic
from ...config import TrainConfig
from ...errors import IptError
from ...layout import RunLayout
from . import checkpoint, cpu_shims, early, hf_init
from .attention import probe_choice
from .data import build_dataset, micro_batches
from .metrics import MetricsLog, step_profiler
from .model import build_model, flops_per_token, num_parameters, wrap_ddp
from .profile import Profile, RankPlacement, placement, rank_placement, rank_seed, resolve

EXIT_RESUME = 75  # EX_TEMPFAIL: "saved a checkpoint, run me again" (the sbatch script requeues on it)
STEP_SLEEP_ENV = "IPT_TRAIN_TEST_STEP_SLEEP"  # test hook: seconds to sleep after each step (signal tests)


class StopFlag:
    """Set by the warning signal / SIGTERM; read only between steps, so a step is never cut in half."""

    def __init__(self, names: list[str]) -> None:
        self.reason: str | None = early.first(names)  # one that arrived while torch was being imported
        for name in names:
            signal.signal(getattr(signal, f"SIG{name.upper().removeprefix('SIG')}"), self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name


def _init_distributed(on_gpu: bool) -> RankPlacement:
    """Join the process group from torchrun's or srun's environment (srun: SLURM_PROCID, SLURM_NTASKS); a GPU
    rank takes the CUDA device of its node-local rank."""
    env = os.environ
    where = rank_placement(env, torch.cuda.device_count() if on_gpu else None)
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = (
            env["SLURM_PROCID"],
            env["SLURM_NTASKS"],
            env["SLURM_LOCALID"],
        )
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29511")
    if on_gpu:
        torch.cuda.set_device(where.cuda_device)
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    return where


def _log_ranks(where: RankPlacement, device: str, out: Path, log: MetricsLog) -> None:
    """Every rank's host, global and local rank, device and model-parallel groups: one line per rank on
    stderr (the Slurm log), and the whole table from rank 0 in RUN/train/ranks.json and a ``ranks`` event."""
    from megatron.core import parallel_state as ps

    def members(group: Any) -> list[int]:
        return torch.distributed.get_process_group_ranks(group)

    me = {
        **where.describe(),
        "device": device,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "tp_group": members(ps.get_tensor_model_parallel_group()),
        "pp_group": members(ps.get_pipeline_model_parallel_group()),
        "dp_group": members(ps.get_data_parallel_group()),
    }
    print(
        f"train: rank {me['rank']}/{me['world_size']} on {me['host']} (local rank {me['local_rank']}, {device},"
        f" GPU path {me['cuda_device']}): tp {me['tp_group']} pp {me['pp_group']} dp {me['dp_group']}",
        file=sys.stderr,
        flush=True,
    )
    table: list[Any] = [None] * where.world_size
    torch.distributed.all_gather_object(table, me)
    if where.rank == 0:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        write_json_atomic(
            out / "ranks.json", {"job": os.environ.get("SLURM_JOB_ID"), "restart": restart, "ranks": table}
        )
        log.event("ranks", hosts=sorted({r["host"] for r in table}), ranks=table)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the unmasked positions of one micro-batch."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output.view(-1).float() * mask) / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}  # clone: the schedule divides the loss in place


def _forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(_loss_func, batch["loss_mask"])


def _optimizer(cfg: TrainConfig, ddp: Any, *, bf16: bool, distributed: bool) -> tuple[Any, Any]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    decay = cfg.lr_decay_iters or cfg.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_iters else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=max(decay, cfg.lr_warmup_iters + 1),
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def train(cfg: TrainConfig, run_dir: Path) -> int:
    """Train (or resume) on this rank; returns the exit code (0 done, EXIT_RESUME saved for a requeue)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    started = time.time()
    profile = resolve(cfg)  # what Megatron-Core is handed: a function of the config (see profile.py)
    on_gpu = placement(profile) == "cuda"  # refuses train.device=cuda on a node without CUDA
    bf16 = profile.bf16
    stop = StopFlag([cfg.exit_signal, "TERM"])  # before the (slow) setup: a signal during it is kept
    hf_init.ensure_imported(cfg, run_dir)  # train.init_from_hf: iter_0000000 from a Hugging Face folder, once
    where = _init_distributed(on_gpu)
    if not on_gpu:
        cpu_shims.apply()  # no-op with CUDA
    ps.initialize_model_parallel(cfg.tensor_parallel, cfg.pipeline_parallel)
    rank, dp, dp_rank = torch.distributed.get_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise SystemExit(f"train: global_batch_size {cfg.global_batch_size} is not a multiple of micro x DP {dp}")
    torch.manual_seed(cfg.seed)
    if on_gpu:  # each pipeline stage its own stream (Megatron-LM's offset); TP ranks are offset inside
        tensor_parallel.model_parallel_cuda_manual_seed(rank_seed(cfg.seed, ps.get_pipeline_model_parallel_rank()))
    out = RunLayout.of(run_dir).train
    log = MetricsLog(out, enabled=rank == 0)
    if rank == 0:
        (out / "done.json").unlink(missing_ok=True)  # from an earlier, shorter run of this folder

    ckpt_root = RunLayout.of(run_dir).checkpoints
    resume_from = checkpoint.latest(ckpt_root)
    init_from = None
    model = build_model(cfg, profile, device="cuda" if on_gpu else "cpu")
    if resume_from is not None and checkpoint.is_model_only(resume_from):  # imported weights: fresh optimizer
        checkpoint.load_model(resume_from, model)
        init_from, resume_from = str(resume_from), None
    distributed_opt = profile.distributed_optimizer
    ddp = wrap_ddp(model, cfg, use_distributed_optimizer=distributed_opt)
    optimizer, scheduler = _optimizer(cfg, ddp, bf16=bf16, distributed=distributed_opt)
    config = model.config  # the pipeline schedules read these hooks
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    checkpoint.start_writer_helper([cfg.exit_signal, "TERM"])
    iteration = 0
    if resume_from is not None:
        iteration = checkpoint.load(resume_from, ddp, optimizer, scheduler, on_gpu, profile)
    dataset = build_dataset(cfg, run_dir, out / "cache")
    device = torch.cuda.current_device() if on_gpu else "cpu"
    log.event(
        "resume" if resume_from else "start",
        iteration=iteration,
        init_from=init_from,
        world_size=torch.distributed.get_world_size(),
        tp=cfg.tensor_parallel,
        pp=cfg.pipeline_parallel,
        dp=dp,
        parameters=num_parameters(cfg),
        device="cuda" if on_gpu else "cpu",
        profile=profile.describe(),  # layer spec, precision, fusions, optimizer and checkpoint format that ran
        attention_kernel=attention_kernel(cfg, profile, device),
        setup_s=round(time.time() - started, 2),
    )
    _log_ranks(where, where.cuda_device if on_gpu else "cpu", out, log)

    forward_backward = get_forward_backward_func()
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    step_sleep = float(os.environ.get(STEP_SLEEP_ENV, "0"))
    reason, interval_start, interval_steps = None, time.time(), 0
    while iteration < cfg.train_iters:
        with step_profiler(cfg.torch_profile_step == iteration + 1, on_gpu, out, iteration + 1, rank == 0):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses = forward_backward(
                forward_step_func=_forward_step,
                data_iterator=micro_batches(dataset, cfg, iteration, dp_rank, dp, device),
                model=[ddp],
                num_microbatches=num_micro,
                seq_length=cfg.seq_length,
                micro_batch_size=cfg.micro_batch_size,
                forward_only=False,
            )
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
        iteration += 1
        if step_sleep:
            time.sleep(step_sleep)
        interval_steps += 1

        # the step's mean loss: last pipeline stage's micro-batch mean, averaged over all of its ranks
        loss = torch.zeros(1, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage():
            loss += torch.stack([x["lm loss"].double() for x in losses]).mean()
        # one all-reduce for the loss and one for the stop flag: every rank agrees on where to stop
        torch.distributed.all_reduce(loss)
        flag.fill_(1 if (stop.reason or _over_time(cfg, started)) else 0)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters or flag.item():
            elapsed = time.time() - interval_start
            tps = tokens_per_step * interval_steps / elapsed
            log.step(
                iteration=iteration,
                loss=loss.item() / (cfg.tensor_parallel * dp),
                lr=scheduler.get_lr(optimizer.param_groups[0]),
                grad_norm=None if grad_norm is None else float(grad_norm),
                tokens_per_s=round(tps, 1),
                mfu=round(flops_per_token(cfg) * tps / (cfg.peak_flops * torch.distributed.get_world_size()), 4)
                if on_gpu
                else None,
                step_s=round(elapsed / interval_steps, 4),
                mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
            )
            interval_start, interval_steps = time.time(), 0
        if flag.item():
            reason = stop.reason or "exit-duration"
            break
        if cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < cfg.train_iters:
            _save(ckpt_root, ddp, optimizer, scheduler, iteration, cfg, on_gpu, profile, log, dp)

    done = iteration >= cfg.train_iters
    if cfg.final_save or not done:
        _save(ckpt_root, ddp, optimizer, scheduler, iteration, cfg, on_gpu, profile, log, dp)
    log.event("done" if done else "exit", iteration=iteration, reason=reason)
    if done and rank == 0:
        final = checkpoint.iter_dir(ckpt_root, iteration) if cfg.final_save else None
        write_json_atomic(out / "done.json", {"iteration": iteration, "checkpoint": final and str(final)})
    log.close()
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0 if done else EXIT_RESUME


def attention_kernel(cfg: TrainConfig, profile: Profile, device: Any) -> str | None:
    """The SDPA kernel this rank's attention runs (flash, cudnn, efficient, math), as PyTorch's dispatcher
    picks it for the rank's per-partition shapes and dtype; None where SDPA does not run."""
    if profile.attention != "sdpa":
        return None
    m, tp = cfg.model, cfg.tensor_parallel
    heads = m.num_attention_heads // tp
    groups = max(1, (m.num_query_groups or m.num_attention_heads) // tp)
    choice = probe_choice(
        heads=heads,
        groups=groups,
        head_dim=m.hidden_size // m.num_attention_heads,
        seq=cfg.seq_length,
        batch=cfg.micro_batch_size,
        dtype=torch.bfloat16 if profile.bf16 else torch.float32,
        device=device,
    )
    return choice.describe()


def _over_time(cfg: TrainConfig, started: float) -> bool:
    return cfg.exit_duration_min is not None and time.time() - started > cfg.exit_duration_min * 60


def _save(
    root: Path,
    ddp: Any,
    optimizer: Any,
    scheduler: Any,
    iteration: int,
    cfg: TrainConfig,
    on_gpu: bool,
    profile: Profile,
    log: MetricsLog,
    dp: int,
) -> None:
    if checkpoint.latest(root) == checkpoint.iter_dir(root, iteration):
        return  # already saved (e.g. a resumed run stopped again before its first step)
    t0 = time.time()
    meta = {
        "dp": dp,
        "tp": cfg.tensor_parallel,
        "pp": cfg.pipeline_parallel,
        "tokens": iteration * cfg.global_batch_size * cfg.seq_length,
        "layer_spec": profile.layer_spec,
        "optim_sharding": profile.optim_sharding,
    }
    folder = checkpoint.save(root, ddp, optimizer, scheduler, iteration, meta, on_gpu, profile)
    checkpoint.prune(root, cfg.keep_checkpoints)
    log.event("save", iteration=iteration, dir=folder.name, seconds=round(time.time() - t0, 3))


def main(argv: list[str] | None = None) -> int:
    """Rank entry point: ``python -m ipt_hpc.model.train RUN [--config FILE] [--set KEY=VALUE ...]``."""
    from ...config import load_config

    p = argparse.ArgumentParser(
        prog="python -m ipt_hpc.model.train", description="one training rank (use launch train)"
    )
    p.add_argument("run", help="run folder (reads RUN/tokens, writes RUN/train)")
    p.add_argument("--config", help="config file (default: the run's resolved RUN/train/config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    cfg = load_config(args.config or RunLayout.of(run_dir).train_config, args.overrides).train
    try:
        return train(cfg, run_dir)
    except IptError as exc:  # a user's error (e.g. no CUDA for train.device=cuda): one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
