"""``pipeline``: submit every available stage at once, each waiting for the previous one.

On Slurm each step's jobs depend on the previous step's with ``afterok`` (a failed step cancels
the rest: ``--kill-on-invalid-dep=yes``). A stage that plans its own fan-out (``shard``: scan, plan,
write) runs as one small *coordinator* job that submits and waits for its arrays; per-shard stages
are submitted directly as arrays. On the local and debug backends the steps simply run in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic
from .config import Config, ExecutionConfig
from .errors import IptError
from .execution import StageRun, StageState, build, launch, run_stage
from .execution.backends import submit_job
from .execution.state import stage_label
from .layout import RunLayout
from .timeline import log_step


@dataclass(frozen=True)
class Coordinator:
    """A stage that fans out by itself, run as one job: ``fn(*args)``."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class ShardStage:
    """A per-shard stage, submitted as job arrays."""

    run: StageRun
    spec: str = "all"

    @property
    def name(self) -> str:
        return stage_label(self.run.stage, self.run.out_folder)


@dataclass(frozen=True)
class Job:
    """A step that is one job of its own (training): ``run_here()`` blocks locally and returns its exit
    code; ``submit(dependency)`` submits it on Slurm and returns the job id."""

    name: str
    run_here: Callable[[], int]
    submit: Callable[[str | None], str]
    nodes: int = 1  # of the Slurm job (training: train.nodes)


Step = Coordinator | ShardStage | Job


def submit(
    steps: Sequence[Step],
    cfg: ExecutionConfig,
    run_dir: str | Path,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Submit (Slurm) or run (local/debug) ``steps`` in order; returns one summary per step.

    ``progress(step, shards_done, shards)`` is called as the shards of a local per-shard step finish.
    """
    layout = RunLayout.of(run_dir)
    log_dir = layout.pipeline_logs
    results: list[dict[str, Any]] = []
    dependency: str | None = None
    for step in steps:
        if cfg.backend != "slurm":
            if isinstance(step, Coordinator):
                step.fn(*step.args)
                results.append({"step": step.name, "ran": True})
            elif isinstance(step, Job):
                rc = step.run_here()
                if rc != 0:
                    raise IptError(f"pipeline: step {step.name} exited with code {rc}; rerun the pipeline to resume")
                results.append({"step": step.name, "ran": True})
            else:
                state = StageState(step.run.out_dir)
                n = step.run.num_shards
                cb = (lambda s=step, st=state, n=n: progress(s.name, len(st.names("done")), n)) if progress else None
                results.append({"step": step.name, **launch(step.run, step.spec, cfg, on_progress=cb)})
            continue
        if isinstance(step, Coordinator):
            job = submit_job(
                step.fn, *step.args, cfg=cfg, log_dir=log_dir, job_name=f"ipt-{step.name}", dependency=dependency
            )
            ids = [job]
            results.append({"step": step.name, "job_ids": ids, "tasks": 1, "nodes": 1, "dependency": dependency})
        elif isinstance(step, Job):
            ids = [step.submit(dependency)]
            results.append(
                {"step": step.name, "job_ids": ids, "tasks": 1, "nodes": step.nodes, "dependency": dependency}
            )
        else:
            info = launch(step.run, step.spec, cfg, dependency=dependency)
            ids = info.get("job_ids", [])
            results.append({"step": step.name, **info, "nodes": 1, "dependency": dependency})
        if ids:
            dependency = "afterok:" + ":".join(ids)
    if cfg.backend == "slurm":
        write_json_atomic(layout.state / f"pipeline-{time.strftime('%Y%m%dT%H%M%S')}.json", {"steps": results})
    return results


def run_here(
    steps: Sequence[Step],
    cfg: ExecutionConfig,
    run_dir: str | Path,
    *,
    on_step: Callable[[int, Step], Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Run ``steps`` one after the other on the local or debug backend.

    ``on_step(i, step)`` is entered around each step (a context manager, e.g. a progress display);
    ``progress`` is called as the shards of a per-shard step finish. A failed step stops the pipeline
    with an error that names it, the steps that did not run, and how to resume.
    """
    from contextlib import nullcontext

    steps_log = RunLayout.of(run_dir).steps_log
    for i, step in enumerate(steps):
        with on_step(i, step) if on_step else nullcontext():
            started = time.time()
            try:
                submit([step], cfg, run_dir, progress=progress if isinstance(step, ShardStage) else None)
                log_step(steps_log, step.name, started)
            except IptError as exc:
                later = ", ".join(s.name for s in steps[i + 1 :]) or "none"
                raise IptError(
                    f"pipeline stopped at step {i + 1}/{len(steps)} ({step.name}); later steps did not run ({later})."
                    f" Rerunning this pipeline command resumes it (done shards are kept).\n{exc}"
                ) from exc


def verdict(run_dir: str | Path, started: float) -> tuple[bool, str, dict[str, Any]]:
    """How a Slurm pipeline that left the queue ended: ``(finished, message, status report)``.

    A failed shard is the root cause when there is one; without one, a pipeline whose report was not
    written after ``started`` ended in a job step (train, export, eval, mixture or report).
    """
    from .status import run_status

    report = run_status(run_dir)
    if report["root_cause"]:
        return False, "later steps were cancelled", report
    layout = RunLayout.of(run_dir)
    final = layout.report / "report.md"
    if not final.exists() or final.stat().st_mtime < started:
        return (
            False,
            (
                "no shard failed, so a job step did (train, export, eval, mixture or report); their logs:"
                f" {layout.pipeline_logs}, {layout.train / 'logs'}"
            ),
            report,
        )
    return True, "", report


def available_steps(cfg: Config, run_dir: str | Path) -> list[Step]:
    """The stages ``cfg`` asks for, in pipeline order, built before any of them ran.

    shard always; with ``decontaminate.enabled``, the n-gram index of the eval tasks and decontaminate over the raw
    shards (raw -> raw-clean, read by everything after it); synthesize and templify when ``synth.model`` is set
    (with decontaminate over the synthesized records between them: synth -> synth-clean); tokenize (per record group of
    templify's output, or of the raw shards without synthesis) and the mixture report when
    ``tokenize.tokenizer`` is set; train (blending the groups by the mixture report), export and eval
    when the config has a ``train`` section; the report last. Shard counts come from ``shard.num_shards``
    (the shard stage writes exactly that many), so every step can be submitted at once behind its
    predecessor.
    """
    from . import report
    from .stages import decontam_index, decontaminate, mixture, shard, synthesize, templify, tokenize

    run_dir = Path(run_dir)
    n = cfg.shard.num_shards
    inner = cfg.model_copy(deep=True)
    raw = RunLayout.of(run_dir).raw
    inner = inner.model_copy(update={"shard": inner.shard.model_copy(update={"output_folder": raw.name})})
    # scan and plan, then the shard arrays: one coordinator job that submits them and waits
    steps: list[Step] = [Coordinator("shard", partial(run_stage, wait=True), (shard.STAGE, inner, str(run_dir)))]
    raw_folder = raw.name
    if cfg.decontaminate.enabled:  # the index once, then the raw shards before synthesis (docs/decontamination.md)
        steps.append(Coordinator("decontaminate-index", decontam_index.build_index, (cfg, str(run_dir))))
        dcfg = _decontaminating(cfg, raw_folder)
        steps.append(ShardStage(build(decontaminate.STAGE, dcfg, run_dir, n)))
        raw_folder = decontaminate.output_folder(dcfg)
        cfg = _reading(cfg, synth=raw_folder, raw=raw_folder)
    if cfg.synth.model:
        steps.append(ShardStage(build(synthesize.STAGE, cfg, run_dir, n)))
        if cfg.decontaminate.enabled:  # the synthesized pairs: the synthesizer may write a benchmark item
            synth = RunLayout.of(run_dir).synth.name
            dcfg = _decontaminating(cfg, synth)
            steps.append(ShardStage(build(decontaminate.STAGE, dcfg, run_dir, n)))
            cfg = _reading(cfg, templify=decontaminate.output_folder(dcfg))
        steps.append(ShardStage(build(templify.STAGE, cfg, run_dir, n)))
    if cfg.tokenize.tokenizer:
        if cfg.synth.model:
            groups = [g for g in ("augmented", "raw") if g != "raw" or cfg.synth.convert_share < 1]
            variants = [{"input_stage": cfg.templify.output_folder, "record_group": g, "group": g} for g in groups]
        else:
            variants = [{"input_stage": raw_folder, "record_group": None, "group": "raw"}]
        for v in variants:
            tcfg = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update=v)})
            steps.append(ShardStage(build(tokenize.STAGE, tcfg, run_dir, n)))
        groups = {g: spec for g, spec in cfg.mixture.groups.items() if g in {v["group"] for v in variants}}
        if groups:
            args = (str(run_dir), groups, cfg.mixture.train_tokens)
            steps.append(Coordinator("mixture", mixture.write_report, args))
            if "train" in cfg.model_fields_set:
                steps += training_steps(cfg, run_dir)
    steps.append(Coordinator("report", report.build, (str(run_dir),)))
    return steps


def _decontaminating(cfg: Config, folder: str) -> Config:
    """The config of the decontaminate step that reads ``folder`` (into ``<folder>-clean``)."""
    d = cfg.decontaminate.model_copy(update={"input_stage": folder, "output_folder": None, "group": None})
    return cfg.model_copy(update={"decontaminate": d})


def _reading(cfg: Config, *, synth: str | None = None, raw: str | None = None, templify: str | None = None) -> Config:
    """``cfg`` with the stages after a decontaminate step reading its output: synthesize's documents, templify's
    unconverted documents (``raw``) and its synthesized records."""
    update: dict[str, Any] = {}
    if synth:
        update["synth"] = cfg.synth.model_copy(update={"input_stage": synth})
    t = {}
    if raw and cfg.templify.raw_stage:
        t["raw_stage"] = raw
    if templify:
        t["input_stage"] = templify
    if t:
        update["templify"] = cfg.templify.model_copy(update=t)
    return cfg.model_copy(update=update)


def outputs(run_dir: str | Path) -> list[tuple[str, Path]]:
    """Where a run's results lie (those that exist), for the summary after a pipeline."""
    run = RunLayout.of(run_dir)
    groups = sorted(p for p in run.tokens.glob("*") if p.is_dir())
    wanted = [
        ("raw shards", run.raw),
        ("synthesized pairs", run.synth),
        ("instruction-augmented texts", run.augmented),
        *[(f"token group {p.name}", p.with_suffix(".bin")) for p in groups],
        ("mixture (blend weights)", run.mixture),
        ("training log", run.train_log),
        ("loss curve", run.train / "loss.png"),
        ("checkpoints", run.checkpoints),
        ("Hugging Face model", run.hf),
        ("evaluation", run.eval / "results.md"),
        ("report", run.report / "report.html"),
    ]
    return [(what, path) for what, path in wanted if path.exists()]


def training_steps(cfg: Config, run_dir: Path) -> list[Step]:
    """train (groups and weights from the mixture report), export to RUN/hf, eval of RUN/hf."""
    from .model import evaluate, export
    from .model.train import stage as train_stage

    tcfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"data": cfg.train.data.model_copy(update={"mixture": True})})}
    )
    run = RunLayout.of(run_dir)
    hf = run.hf
    ecfg = cfg.eval.model_copy(update={"model": str(hf)})
    return [
        Job(
            "train",
            partial(train_stage.run_local, tcfg, run_dir),
            partial(train_stage.submit_slurm, tcfg, run_dir),
            nodes=tcfg.train.nodes,
        ),
        # the latest complete checkpoint; the tokenizer is the one the token groups were made with
        Coordinator("export", partial(export.export, force=True), (str(run.checkpoints), str(hf))),
        Coordinator("eval", evaluate.run, (ecfg, str(run.eval))),
    ]
