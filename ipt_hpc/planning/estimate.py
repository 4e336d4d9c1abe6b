"""The plan: the calibration's per-document figures scaled to the corpus, per stage of the config's
pipeline: work, GPU- and CPU-hours, the array layout, disk, and wall time at the allowed parallelism.

Pure arithmetic over the calibration (plus one ``scontrol`` call on Slurm for ``MaxArraySize``), so a
plan for 10,000 shards takes milliseconds and submits nothing. Every figure names its source.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import IptError
from .calibrate import concurrency, waves


def _per_task_cpus(cfg: Config) -> int:
    ex = cfg.execution
    if ex.backend == "slurm":
        return ex.slurm.cpus_per_task or 1
    return max(1, (os.cpu_count() or 1) // max(1, ex.workers or os.cpu_count() or 1))


def _stage_gpus(cfg: Config, stage: str) -> int:
    """GPUs a task of ``stage`` holds: the synthesizer's engine on a GPU, nothing else."""
    if not stage.startswith("synthesize"):
        return 0
    s = cfg.synth
    if s.backend == "server" and not s.server.launch:
        return 0  # the tasks send requests; the served model's GPUs are the server job's
    on_gpu = s.backend in ("vllm", "server") or s.device.startswith("cuda")
    if s.device == "auto" and cfg.execution.backend == "slurm":
        on_gpu = bool(cfg.execution.slurm.gpus_per_node)
    if not on_gpu:
        return 0
    return cfg.execution.slurm.gpus_per_node or s.tensor_parallel_size


def _max_array(cfg: Config) -> tuple[int | None, str]:
    ex = cfg.execution
    if ex.backend != "slurm":
        return None, ""
    if ex.max_array_size is not None:
        return ex.max_array_size, "execution.max_array_size"
    from ..execution.backends import cluster_max_array_size

    return cluster_max_array_size(), "the cluster's MaxArraySize (scontrol show config)"


def layout(cfg: Config, shards: int, shard_s: float, load_s: float, max_array: int | None) -> dict[str, Any]:
    """Shards per task, tasks, arrays and sbatch calls, the throttle, task minutes and whether they fit.

    On Slurm the plan packs as many shards into a task as fit ``time_min`` less ``plan.time_margin``, no
    more than keeps the throttle busy, and no more than needed to make the model load a tenth of a task.
    """
    ex = cfg.execution
    if ex.backend != "slurm":
        workers = concurrency(cfg, shards)
        per_worker = math.ceil(shards / workers)
        return {
            "backend": ex.backend,
            "shards": shards,
            "shards_per_task": per_worker,
            "tasks": workers,
            "arrays": 0,
            "sbatch_calls": 0,
            "throttle": workers,
            "task_min": (load_s + per_worker * shard_s) / 60,
            "fits": True,
            "note": f"{workers} local worker process(es), shards interleaved",
        }
    limit_s = ex.slurm.time_min * 60 * (1 - cfg.plan.time_margin)
    room = limit_s - load_s
    fits = shard_s <= room
    fit = max(1, math.floor(room / shard_s)) if shard_s > 0 and room > 0 else shards
    amortise = max(1, math.ceil(9 * load_s / shard_s)) if shard_s > 0 else shards
    throttle_cap = math.ceil(shards / ex.parallelism) if ex.parallelism else shards
    per_task = max(1, min(fit, amortise, throttle_cap, shards))
    tasks = math.ceil(shards / per_task)
    arrays = math.ceil(tasks / max_array) if max_array else 1
    note = (
        f"a task fits {ex.slurm.time_min} min less {cfg.plan.time_margin:.0%} margin"
        if fits
        else f"one shard alone needs {shard_s / 60:,.1f} min: raise shard.num_shards to at least"
        f" {math.ceil(shards * shard_s / max(1.0, room)):,}"
    )
    if per_task != ex.shards_per_task:
        note += f"; set execution.shards_per_task={per_task} (config: {ex.shards_per_task})"
    return {
        "backend": "slurm",
        "shards": shards,
        "shards_per_task": per_task,
        "tasks": tasks,
        "arrays": arrays,
        "sbatch_calls": arrays,
        "throttle": ex.parallelism,
        "task_min": (load_s + per_task * shard_s) / 60,
        "fits": fits,
        "note": note,
    }


def _wall(cfg: Config, lay: dict[str, Any], shard_s: float, load_s: float, overhead_s: float) -> float:
    """The step's fixed costs, then its tasks in rounds of those that run at once (local: one round of
    workers)."""
    rounds_of_tasks = math.ceil(lay["tasks"] / concurrency(cfg, lay["tasks"]))
    return overhead_s + rounds_of_tasks * (load_s + lay["shards_per_task"] * shard_s)


# the calibration's rates shown with the plan (what each stage's figures scale)
MEASURED = {
    "gen_tokens_per_s": "engine tokens/s",
    "gen_tokens_mean": "generated tokens/document",
    "prompt_tokens_mean": "prompt tokens/document",
    "load_s": "load s/task",
    "mb_per_s_per_core": "MB/s per core",
    "output_ratio": "output/raw bytes",
    "seconds_per_doc": "s/document",
}


def full_waves(fig: dict[str, Any], cal: dict[str, Any]) -> int:
    """Sample documents whose synthesized share fills every round's wave in every calibration shard."""
    return math.ceil(fig["rounds"] * fig["engine_batch"] * cal["concurrency"] / max(1e-9, fig["synthesized_per_doc"]))


def data_stage(
    cfg: Config, name: str, fig: dict[str, Any], docs: int, cal: dict[str, Any], max_array: int | None
) -> dict[str, Any]:
    """One per-shard stage of the plan from its calibration figures."""
    shards = cfg.shard.num_shards
    per_shard = docs / shards
    shard_s = per_shard * fig["seconds_per_doc"]
    notes = []
    if fig.get("gen_tokens_per_s"):  # synthesis: generated tokens at the engine's measured rate, and the rest
        synthesized = per_shard * cfg.synth.convert_share  # the by-id choice converts this share on average
        shard_s = (
            synthesized * fig["gen_tokens_mean"] / fig["gen_tokens_per_s"] + per_shard * fig["other_seconds_per_doc"]
        )
        if fig["wave_fill"] < 0.5 and synthesized / fig["rounds"] > fig["engine_batch"] / 2:
            fuller = waves(synthesized, fig["rounds"], fig["engine_batch"]) * fig["wave_s"]
            fuller += per_shard * fig["other_seconds_per_doc"]
            share = fuller / max(1e-9, shard_s)
            notes.append(
                f"the calibration ran the engine at {fig['wave_fill']:.0%} of its batch ({fig['engine_batch']});"
                " the run fills it more, and a GPU engine is faster per token then: down to"
                f" {share:.0%} of this time if a full batch cost what a small one did. Calibrate with about"
                f" {full_waves(fig, cal)} documents to measure it"
            )
        notes += _server_notes(cfg)
    load_s = fig.get("load_s", 0.0)
    lay = layout(cfg, shards, shard_s, load_s, max_array)
    busy = lay["tasks"] * load_s + shards * shard_s
    gpus = _stage_gpus(cfg, name)
    n = cal["sample_docs"]
    src = f"calibration on {n} sample documents ({cal['concurrency']} shard(s) at once, {cal['executor']})"
    work: dict[str, Any] = {"records": round(docs * fig["records_per_doc"])}
    spread = cal["corpus"].get("bytes_per_doc_cv", 0.0)
    if "gen_tokens_mean" in fig:
        synthesized = docs * cfg.synth.convert_share
        work["input_tokens"] = round(synthesized * fig.get("prompt_tokens_mean", 0))
        work["output_tokens"] = round(synthesized * fig["gen_tokens_mean"])
        spread = fig.get("gen_tokens_cv", spread)
        n = fig.get("synthesized_docs", n)
    elif "tokens_per_doc" in fig:
        work["output_tokens"] = round(docs * fig["tokens_per_doc"])
    return {
        "stage": name,
        "kind": "data",
        "folder": fig["folder"],
        "work": work,
        "gpu_hours": busy * gpus / 3600,
        "cpu_hours": busy * (0 if gpus else _per_task_cpus(cfg)) / 3600,
        "layout": lay,
        "output_bytes": docs * fig["bytes_per_doc"] + fig.get("fixed_bytes", 0),
        "wall_s": _wall(cfg, lay, shard_s, load_s, fig["overhead_s"]),
        "uncertainty": spread / math.sqrt(max(1, n)),
        "source": src,
        "measured": {k: fig[k] for k in MEASURED if fig.get(k) is not None},
        "notes": notes,
    }


def _server_notes(cfg: Config) -> list[str]:
    s = cfg.synth
    if s.backend != "server":
        return []
    if s.server.launch:
        return ["synth.server.launch: each task starts its own server; its start-up is in the load time per task"]
    return [
        f"synth.server.url: the tasks share the server at {s.server.url}; its GPU-hours are the server job's (not"
        " counted here), and the wall time assumes the rate measured by the calibration holds for all the tasks"
        " at once: more tasks than the server has room for only queue at it"
    ]


def doctor_throughput(cfg: Config, path: str | Path) -> dict[str, Any]:
    """Training tokens/s of the configured model from a ``doctor --gpu`` report: the MFU it measured with
    Megatron-Core, applied to the configured model's FLOPs per token on its ranks."""
    from ..atomic import read_json
    from ..model.train.model import flops_per_token

    if not Path(path).exists():
        raise IptError(f"plan --doctor: {path} does not exist (write it with doctor --gpu --out {path})")
    report = read_json(path)
    train = report.get("checks", {}).get("train", {})
    if not train.get("ok") or not train.get("mfu"):
        raise IptError(f"plan --doctor: {path} holds no Megatron-Core training figure with an MFU (run doctor --gpu)")
    t = cfg.train
    fpt = flops_per_token(t)
    return {
        "tokens_per_s": train["mfu"] * t.peak_flops * t.world_size() / fpt,
        "source": f"doctor --gpu {path}: MFU {train['mfu']:.1%} measured on {train.get('ranks', '?')} GPU(s) of"
        f" {report.get('host', '?')}, applied to the configured model ({fpt / 1e9:.2f} GFLOP/token,"
        f" {t.world_size()} rank(s))",
    }


def model_stages(
    cfg: Config, fig: dict[str, Any] | None, cal: dict[str, Any], doctor: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """train, export and eval from the calibration's short training run, export and evaluation; training
    throughput from a ``doctor --gpu`` report instead when one is given."""
    t = cfg.train
    ranks = t.world_size()
    gpu = t.device == "cuda"
    tokens = t.train_iters * t.global_batch_size * t.seq_length
    fig = fig or {}
    tok_s = doctor["tokens_per_s"] if doctor else fig["tokens_per_s"]
    train_s = fig.get("train_overhead_s", 0.0) + tokens / tok_s
    kept = min(t.keep_checkpoints, math.ceil(t.train_iters / t.save_interval) if t.save_interval else 1)
    src = f"calibration: {fig.get('iterations')} iterations of the configured model ({cal['executor']})"

    def row(stage: str, wall: float, bytes_: float, work: dict[str, Any], source: str) -> dict[str, Any]:
        return {
            "stage": stage,
            "kind": "model",
            "work": work,
            "gpu_hours": wall * ranks / 3600 if gpu else 0.0,
            "cpu_hours": 0.0 if gpu else wall * ranks / 3600,
            "layout": {"backend": cfg.execution.backend, "tasks": 1, "note": f"one job, {ranks} rank(s)"},
            "output_bytes": bytes_,
            "wall_s": wall,
            "uncertainty": 0.0 if doctor else fig.get("tokens_per_s_cv") or 0.0,
            "source": source,
        }

    rows = [
        row(
            "train",
            train_s,
            kept * fig.get("checkpoint_bytes", 0),
            {"train_tokens": tokens},
            doctor["source"] if doctor else src,
        )
    ]
    if not fig:
        return rows  # export and eval are measured by the calibration only
    rows.append(
        row("export", fig["export_s"], fig["hf_bytes"], {}, src.replace("iterations of", "iterations, export of"))
    )
    if "eval_s" in fig:
        scaled = f"scaled {fig['eval_scale']:.1f}x to the tasks' sizes"
        rows.append(row("eval", fig["eval_s"] * fig["eval_scale"], 0, {}, f"calibration: evaluation, {scaled}"))
    else:
        rows[-1]["notes"] = [f"eval was not measured by the calibration: {fig.get('eval_error', 'no figure')}"]
    return rows


def make_plan(
    cfg: Config, cal: dict[str, Any], *, docs: int | None = None, doctor: str | Path | None = None
) -> dict[str, Any]:
    """The plan of ``cfg`` from the calibration ``cal`` (``docs`` overrides the corpus's document count;
    ``doctor``, a ``doctor --gpu`` report, gives the training throughput)."""
    corpus = cal["corpus"]
    total_docs = docs if docs is not None else corpus["docs"]
    docs_source = "given (--docs)" if docs is not None else corpus["method"]
    max_array, array_source = _max_array(cfg)
    stages = [data_stage(cfg, name, fig, total_docs, cal, max_array) for name, fig in cal["stages"].items()]
    if "train" in cfg.model_fields_set and ("model" in cal or doctor):
        stages += model_stages(cfg, cal.get("model"), cal, doctor_throughput(cfg, doctor) if doctor else None)
    price_gpu, price_cpu = cfg.plan.gpu_hour_price, cfg.plan.cpu_hour_price
    gpu_h = sum(s["gpu_hours"] for s in stages)
    cpu_h = sum(s["cpu_hours"] for s in stages)
    total: dict[str, Any] = {
        "gpu_hours": gpu_h,
        "cpu_hours": cpu_h,
        "output_bytes": sum(s["output_bytes"] for s in stages),
        "wall_s": sum(s["wall_s"] for s in stages),
    }
    if price_gpu is not None or price_cpu is not None:
        total["cost"] = gpu_h * (price_gpu or 0) + cpu_h * (price_cpu or 0)
        for s in stages:
            s["cost"] = s["gpu_hours"] * (price_gpu or 0) + s["cpu_hours"] * (price_cpu or 0)
    return {
        "docs": total_docs,
        "docs_source": docs_source,
        "shards": cfg.shard.num_shards,
        "backend": cfg.execution.backend,
        "parallelism": cfg.execution.parallelism,
        "max_array_size": max_array,
        "max_array_source": array_source,
        "currency": cfg.plan.currency,
        "calibrated": cal["created"],
        "stages": stages,
        "total": total,
        "queue_wait": "not included (depends on the cluster's load)" if cfg.execution.backend == "slurm" else None,
    }
