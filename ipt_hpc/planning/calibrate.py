"""``plan --calibrate N``: run the real stages on a deterministic sample of N documents and keep what they
measured, per sample document, so that :mod:`.estimate` can scale it to the whole corpus.

The calibration is a scratch run (``RUN/_state/plan/calibration/``) of the same config: the same engine,
the same executor (on Slurm, one job on the target partition runs it), the sample cut into as many shards
as the real run has tasks at once, so contention is measured too. With a ``train`` section a short
training run of the configured model follows (tokens/s, checkpoint size), then the export of its
checkpoint and the evaluation of the export (on ``plan.calibrate_eval_limit`` documents per task).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import read_json, write_json_atomic
from ..config import Config
from ..errors import IptError
from ..execution.state import StageState, stage_label
from ..layout import RunLayout, state_dir
from .compare import folder_bytes, scaling_and_fixed_bytes
from .sample import sample_corpus

Say = Callable[[str], Any]


def calibration_dir(run_dir: str | Path) -> Path:
    """The scratch run of the calibration."""
    return RunLayout.of(run_dir).state / "plan" / "calibration"


def calibration_file(run_dir: str | Path) -> Path:
    return RunLayout.of(run_dir).state / "plan" / "calibration.json"


def concurrency(cfg: Config, tasks: int) -> int:
    """How many of ``tasks`` run at once: local workers, or the Slurm throttle (all at once without one)."""
    ex = cfg.execution
    if ex.backend == "debug":
        return 1
    if ex.backend == "local":
        return max(1, min(tasks, ex.workers or os.cpu_count() or 1))
    return max(1, min(tasks, ex.parallelism or tasks))


def calibrate(cfg: Config, run_dir: str | Path, n: int, *, say: Say = print) -> dict[str, Any]:
    """Calibrate on ``n`` documents (on Slurm inside one job on the configured partition); stores and
    returns the figures (``RUN/_state/plan/calibration.json``)."""
    if cfg.execution.backend != "slurm":
        return calibrate_here(cfg, str(run_dir), n, say=say)
    from ..execution.backends import submit_job, wait_for_jobs

    inner = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"backend": "debug"})})
    log_dir = RunLayout.of(run_dir).state / "logs" / "calibration"
    partition = cfg.execution.slurm.partition or "(default)"
    label = f"slurm: one job on partition {partition}"
    job = submit_job(calibrate_here, inner, str(Path(run_dir).resolve()), n, label, cfg=cfg.execution,
                     log_dir=log_dir, job_name="ipt-calibrate")  # fmt: skip
    say(f"calibration: Slurm job {job} on partition {partition}; logs {log_dir}")
    started = time.time()
    wait_for_jobs([job], poll_s=2.0)
    path = calibration_file(run_dir)
    if not path.exists() or path.stat().st_mtime < started:
        raise IptError(f"calibration job {job} ended without writing {path}; see its log in {log_dir}")
    return read_json(path)


def calibration_config(cfg: Config, sample: Path, shards: int) -> Config:
    """The run's config on the sample, without the training sections (calibrated on their own)."""
    data = cfg.model_dump(mode="json", exclude={"train"})
    data["shard"].update({"inputs": [str(sample)], "format": "jsonl", "num_shards": shards, "output_folder": "raw"})
    return Config.model_validate(data)


def calibrate_here(cfg: Config, run_dir: str, n: int, label: str | None = None, *, say: Say = print) -> dict[str, Any]:
    """The calibration in this process (local and debug backends; inside the Slurm job, ``label`` saying so)."""
    from ..pipeline import Coordinator, available_steps, run_here

    root = calibration_dir(run_dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sample = root / "sample.jsonl"
    corpus = sample_corpus(cfg.shard, n, sample)
    say(
        f"calibration: {corpus['sample_docs']} sample documents; corpus {corpus['docs']:,} documents"
        f" ({corpus['method']})"
    )
    shards = max(1, min(cfg.shard.num_shards, concurrency(cfg, cfg.shard.num_shards), corpus["sample_docs"]))
    ccfg = calibration_config(cfg, sample, shards)
    run = root / "run"
    steps = [s for s in available_steps(ccfg, run) if not (isinstance(s, Coordinator) and s.name == "report")]
    walls: dict[str, float] = {}

    class _Timer:
        def __init__(self, i: int, step: Any) -> None:
            self.name = step.name

        def __enter__(self) -> None:
            self.t = time.perf_counter()
            say(f"calibration: {self.name}")

        def __exit__(self, *exc: Any) -> None:
            walls[self.name] = round(time.perf_counter() - self.t, 3)

    run_here(steps, ccfg.execution, run, on_step=_Timer)
    figures: dict[str, Any] = {
        "created": time.time(),
        "sample_docs": corpus["sample_docs"],
        "corpus": corpus,
        "executor": label or cfg.execution.backend,
        "concurrency": shards,
        "stages": stage_figures(run, corpus["sample_docs"], walls),
    }
    if "train" in cfg.model_fields_set and cfg.tokenize.tokenizer:
        figures["model"] = model_figures(cfg, run, say)
    write_json_atomic(calibration_file(run_dir), figures)
    return figures


def stage_figures(run: Path, docs: int, walls: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per stage of the calibration run: seconds, output bytes, records and tokens per sample document,
    the fixed costs (model load per task, launch and finalize per step) and their spread."""
    from ..status import find_stages

    out: dict[str, dict[str, Any]] = {}
    for folder in find_stages(run):
        state = StageState(folder)
        info = state.read_stage() or {}
        name = stage_label(info["stage"], folder)
        markers = state.read_all("done")
        seconds = [m.get("seconds", 0.0) for m in markers]
        if info["stage"] == "shard":  # the scans run before the shards (one task per input file)
            scans = state.read_all("scan")
            seconds = [s + sum(x.get("seconds", 0.0) for x in scans) / max(1, len(markers)) for s in seconds]
        load = [m.get("load_s", 0.0) for m in markers]
        busy = max(seconds) if seconds else 0.0
        wall = walls.get(name, busy)
        growing, fixed = scaling_and_fixed_bytes(run, folder)
        fig: dict[str, Any] = {
            "folder": str(folder.relative_to(run)),
            "shards": len(markers),
            "wall_s": wall,
            "overhead_s": round(max(0.0, wall - busy), 3),  # launch, input checks, finalize (per step)
            "load_s": round(statistics.fmean(load), 3) if load else 0.0,  # per task (the model, once)
            "seconds_per_doc": (sum(seconds) - sum(load)) / docs,
            "bytes_per_doc": growing / docs,
            "fixed_bytes": fixed,
            "records_per_doc": sum(m.get("records", m.get("docs", 0)) for m in markers) / docs,
        }
        for key in ("tokens", "prompt_tokens", "text_bytes", "pairs"):
            total = sum(m.get(key, 0) for m in markers)
            if total:
                fig[f"{key}_per_doc"] = total / docs
        if info["stage"] == "synthesize":
            fig.update(_synth_spread(folder))
            fig.update(_synth_waves(markers, rounds(folder), docs))
        if info["stage"] == "tokenize":
            fig.update(_tokenize_rate(run, folder, markers))
        if info["stage"] == "templify":  # the augmented corpus's JSON Lines bytes over the raw corpus's
            raw_bytes = sum(m.get("raw_bytes", 0) for m in StageState(RunLayout.of(run).raw).read_all("done"))
            fig["output_ratio"] = (
                round(sum(m.get("raw_bytes", 0) for m in markers) / raw_bytes, 3) if raw_bytes else None
            )
        out[name] = fig
    return out


def _tokenize_rate(run: Path, folder: Path, markers: list[dict[str, Any]]) -> dict[str, Any]:
    """MB/s per tokenizer process: the input shards' JSON Lines bytes (their stage's ``raw_bytes``) over
    the time past the workers' start-up; tokens/s per process likewise."""
    stage_run = read_json(state_dir(folder) / "stage-run.json")
    workers = max(1, int(stage_run["stage_config"].get("workers") or 1))
    busy = sum(m.get("seconds", 0.0) - m.get("load_s", 0.0) for m in markers)
    read = sum(m.get("raw_bytes", 0) for m in StageState(run / stage_run["in_folder"]).read_all("done"))
    if busy <= 0:
        return {}
    return {
        "mb_per_s_per_core": round(read / 1e6 / busy / workers, 2) if read else None,
        "tokens_per_s_per_core": round(sum(m.get("tokens", 0) for m in markers) / busy / workers, 1),
    }


def rounds(folder: Path) -> int:
    """``synth.rounds`` of a synthesize stage folder."""
    return int(read_json(state_dir(folder) / "stage-run.json")["stage_config"]["rounds"])


def waves(docs: float, num_rounds: int, batch: int) -> int:
    """Engine waves of one shard: each round's documents in batches of ``batch`` (round r+1 chains onto r)."""
    per_round = math.ceil(docs / max(1, num_rounds)) if docs else 0
    return sum(math.ceil(min(per_round, max(0.0, docs - r * per_round)) / batch) for r in range(num_rounds))


def _synth_waves(markers: list[dict[str, Any]], num_rounds: int, docs: int) -> dict[str, Any]:
    """The engine's generated tokens/s at the calibration's load, the time per document outside generation,
    and the engine waves the calibration ran (each round's documents in batches of the engine's batch):
    how full they were, and their seconds, for the bound a fuller engine gives."""
    batch = max((m.get("engine_batch", 0) for m in markers), default=0)
    generate = sum(m.get("generate_s", 0.0) for m in markers)
    if not batch or not generate:
        return {}
    total_waves = sum(waves(m.get("docs", 0), num_rounds, batch) for m in markers)
    rest = sum(m.get("seconds", 0.0) - m.get("load_s", 0.0) - m.get("generate_s", 0.0) for m in markers)
    fill = sum(m.get("docs", 0) for m in markers) / max(1, total_waves)
    return {
        "engine_batch": batch,
        "rounds": num_rounds,
        "gen_tokens_per_s": sum(m.get("tokens", 0) for m in markers) / generate,
        "waves": total_waves,
        "wave_s": generate / total_waves if total_waves else 0.0,
        "wave_fill": round(fill / batch, 3),  # how full the calibration's waves were
        "other_seconds_per_doc": max(0.0, rest) / docs,
        "synthesized_per_doc": sum(m.get("docs", 0) for m in markers) / docs,
    }


def _synth_spread(folder: Path) -> dict[str, Any]:
    """Generated and prompt tokens per synthesized document: mean and coefficient of variation."""
    from ..records import read_records

    gen, prompt = [], []
    for path in sorted(folder.glob("shard-*.jsonl.zst")):
        for rec in read_records(path):
            gen.append(rec.get("gen_tokens", 0))
            prompt.append(rec.get("prompt_tokens", 0))
    if not gen:
        return {}

    def cv(xs: list[int]) -> float:
        mean = statistics.fmean(xs)
        return round(statistics.pstdev(xs) / mean, 3) if mean and len(xs) > 1 else 0.0

    return {
        "synthesized_docs": len(gen),
        "gen_tokens_mean": round(statistics.fmean(gen), 1),
        "gen_tokens_cv": cv(gen),
        "prompt_tokens_mean": round(statistics.fmean(prompt), 1),
        "prompt_tokens_cv": cv(prompt),
    }


def model_figures(cfg: Config, run: Path, say: Say) -> dict[str, Any]:
    """A short training run of the configured model on the calibration's token groups, the export of its
    checkpoint and the evaluation of the export: tokens/s, checkpoint and model sizes, seconds."""
    from ..model import evaluate, export
    from ..model.train import stage as train_stage
    from ..model.train.metrics import read_steps
    from ..pipeline import Coordinator, available_steps, run_here

    layout = RunLayout.of(run)
    iters = cfg.plan.calibrate_train_iters
    t = cfg.train
    data = t.data.model_copy(update={"mixture": True})
    short = t.model_copy(
        update={
            "train_iters": iters,
            "save_interval": iters,
            "log_interval": max(1, iters // 6),
            "lr_warmup_iters": min(t.lr_warmup_iters, iters // 2),
            "lr_decay_iters": None,
            "data": data,
        }
    )
    mix = [s for s in available_steps(cfg, run) if isinstance(s, Coordinator) and s.name == "mixture"]
    run_here(mix, cfg.execution, run)  # blend weights of the calibration's groups (training reads them)
    tcfg = cfg.model_copy(update={"train": short})
    say(f"calibration: training {iters} iterations of the configured model")
    started = time.perf_counter()
    rc = train_stage.run_local(tcfg, run)  # torchrun with the configured ranks, here or on the job's node
    train_wall = time.perf_counter() - started
    if rc != 0:
        raise IptError(f"calibration: the training run exited with {rc}; see {layout.train_log} and {layout.train}")
    steps = read_steps(layout.train_log)
    rates = [s["tokens_per_s"] for i, s in sorted(steps.items()) if s.get("tokens_per_s")]
    steady = rates[1:] or rates  # the first interval holds the warm-up
    tokens_per_iter = t.global_batch_size * t.seq_length
    tok_s = statistics.fmean(steady) if steady else tokens_per_iter * iters / train_wall
    ckpts = sorted(layout.checkpoints.glob("iter_*"))
    fig: dict[str, Any] = {
        "iterations": iters,
        "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_cv": round(statistics.pstdev(steady) / tok_s, 3) if len(steady) > 1 and tok_s else None,
        "train_overhead_s": round(max(0.0, train_wall - tokens_per_iter * iters / tok_s), 3),
        "checkpoint_bytes": folder_bytes(ckpts[-1]) if ckpts else 0,
        "mfu": next((s.get("mfu") for _, s in sorted(steps.items(), reverse=True) if s.get("mfu")), None),
    }
    say("calibration: export")
    started = time.perf_counter()
    export.export(str(layout.checkpoints), str(layout.hf), force=True, log=lambda *a: None)
    fig["export_s"] = round(time.perf_counter() - started, 3)
    fig["hf_bytes"] = folder_bytes(layout.hf)
    say("calibration: eval")
    ecfg = cfg.eval.model_copy(update={"model": str(layout.hf), "limit": cfg.plan.calibrate_eval_limit})
    started = time.perf_counter()
    try:
        evaluate.run(ecfg, str(layout.eval), force=True, log_fn=lambda *a: None)
    except IptError as exc:  # e.g. its tasks' datasets cannot be fetched here: the plan says so, no eval row
        say(f"calibration: eval not measured: {exc}")
        fig["eval_error"] = str(exc).splitlines()[0]
        return fig
    fig["eval_s"] = round(time.perf_counter() - started, 3)
    fig["eval_scale"] = _eval_scale(layout.eval)
    return fig


def _eval_scale(folder: Path) -> float:
    """All documents of the eval tasks over those the calibration evaluated (lm-eval's ``n-samples``)."""
    original = effective = 0
    for path in folder.glob("*.json"):
        if path.name == "manifest.json":
            continue
        for counts in (read_json(path).get("n-samples") or {}).values():
            original += int(counts.get("original", 0))
            effective += int(counts.get("effective", 0))
    return original / effective if effective else 1.0
