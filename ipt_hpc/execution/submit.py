"""Submitting a per-shard stage: the stage folder prepared for its config, the shards selected, their input
checked, the shard tasks run or submitted on the configured backend, and the submission recorded for
``status``."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from ..atomic import read_json, write_json_atomic
from ..config import ExecutionConfig
from ..errors import IptError
from ..layout import state_dir
from . import backends
from .selection import compress_ids, parse_shards
from .shards import ShardRunner, StageRun, finalize, input_problem
from .state import StageState, now, shard_name
from .tasks import PackRunner, TaskFailures, run_tasks


class IncompleteInput(IptError):
    """A stage was asked to run on input shards that their stage did not complete."""

    def __init__(self, run: StageRun, problems: dict[str, str]) -> None:
        from .tasks import failure_line, group_failures

        self.problems = problems
        lines = [f"  - {failure_line(names, msg)}" for names, msg in group_failures(list(problems.items()))[:10]]
        upstream = (StageState(run.in_dir).read_stage() or {}).get("stage", run.in_folder)
        super().__init__(
            f"{run.stage}: {len(problems)} input shard(s) in {run.in_dir} are not complete; finish {upstream}"
            " first (e.g. its command with --shards failed), or select only complete shards with --shards:\n"
            + "\n".join(lines)
        )


def input_problems(run: StageRun, shards: list[int]) -> dict[str, str]:
    """:func:`input_problem` of each selected shard that has one (one directory scan when all are done)."""
    upstream = StageState(run.in_dir)
    if upstream.read_stage() is not None and (run.in_dir / "manifest.json").exists():
        return {}
    done = upstream.names("done")
    names = [shard_name(k, run.num_shards) for k in shards]
    return {n: p for n in names if n not in done and (p := input_problem(run, n))}


def prepare(run: StageRun, *, force: bool = False) -> StageState:
    """Check that the stage folder belongs to this config (or wipe it with ``force``)."""
    state = StageState(run.out_dir)
    info = {"stage": run.stage, "num_shards": run.num_shards, "config_hash": run.config_hash()}
    previous = state.read_stage()
    if previous is not None and previous != info:
        if not force:
            raise IptError(
                f"{run.out_dir}: holds {previous['stage']} output of another config ({previous['config_hash']},"
                f" now {info['config_hash']}); pass --force to replace it, or use another run folder"
            )
        import shutil

        for p in run.out_dir.glob("shard-*.*"):
            p.unlink()
        shutil.rmtree(state.root, ignore_errors=True)
        (run.out_dir / "manifest.json").unlink(missing_ok=True)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    state.write_stage(info)
    write_json_atomic(state.root / "stage-run.json", run.to_json())
    return state


def load_stage_run(stage_dir: str | os.PathLike[str]) -> StageRun:
    """The :class:`StageRun` a stage folder was prepared for (read by ``run-shard``)."""
    path = state_dir(stage_dir) / "stage-run.json"
    if not path.exists():
        raise IptError(f"{stage_dir}: not a prepared stage folder (no {path.name}); submit the stage once first")
    return StageRun.from_json(read_json(path))


def select(run: StageRun, spec: str, *, force: bool = False) -> tuple[list[int], list[int]]:
    """``(shards to submit, shards skipped because a job already has them)`` for ``spec``.

    Done shards are dropped unless ``force`` (then :func:`clear` them before running); shards pending
    or running in a live job are never submitted twice (two tasks must not write one shard).
    """
    from .monitor import stage_status

    state = StageState(run.out_dir)
    index = {shard_name(k, run.num_shards): k for k in range(run.num_shards)}
    states = stage_status(run.out_dir)["shards"] if state.read_stage() else {}
    done = {index[n] for n in state.names("done") if n in index}
    failed = {index[n] for n, st in states.items() if st == "failed"}  # markers, and jobs that died
    busy = {index[n] for n, st in states.items() if st in ("pending", "running")}
    chosen = parse_shards(spec, run.num_shards, done=done, failed=failed)
    in_flight = [k for k in chosen if k in busy]
    chosen = [k for k in chosen if k not in busy]
    if force:
        return chosen, in_flight
    return [k for k in chosen if k not in done], in_flight


def clear(run: StageRun, shards: list[int]) -> None:
    """Forget ``shards``: their markers, their outputs and partial outputs (``--force``)."""
    state = StageState(run.out_dir)
    for k in shards:
        name = shard_name(k, run.num_shards)
        state.clear(name)
        stem = name.removesuffix(".jsonl.zst")
        for old in run.out_dir.glob(f"{stem}.*"):  # the output and its partial, whatever the suffix
            old.unlink()


def in_flight(stage_dir: str | os.PathLike[str]) -> set[str]:
    """Shards of a stage that a live job of an earlier submission holds (pending or running): a
    coordinator that was requeued must not submit them a second time (two writers of one file)."""
    from .monitor import stage_status

    if not StageState(stage_dir).submissions():
        return set()
    return {n for n, st in stage_status(stage_dir)["shards"].items() if st in ("pending", "running")}


def wait_for(stage_dir: str | os.PathLike[str], names: set[str], poll_s: float = 2.0) -> None:
    """Block until none of ``names`` is pending or running; raise if one of them ended without being done."""
    from .monitor import stage_status

    while names:
        shards = stage_status(stage_dir)["shards"]
        if not any(shards.get(n) in ("pending", "running") for n in names):
            lost = sorted(n for n in names if shards.get(n) != "done")
            if lost:
                raise IptError(f"{stage_dir}: {', '.join(lost[:5])}: an earlier job held them and ended without"
                               " finishing them; rerun to redo them")  # fmt: skip
            return
        time.sleep(poll_s)


def record_submission(
    state: StageState, shards: list[int], sub: backends.Submission | None = None, *, backend: str = "slurm"
) -> dict[str, Any]:
    """Remember which shards went where, for ``status``; returns a summary of the submission."""
    if sub is None:
        path = state.record_submission({"backend": backend, "shards": shards, "pid": os.getpid()})
        return {"submitted": len(shards), "backend": backend, "record": path}
    arrays = [{"job_id": a["job_id"], "tasks": [[shards[i] for i in t] for t in a["tasks"]]} for a in sub.arrays]
    state.record_submission({"backend": "slurm", "arrays": arrays, "shards": len(shards)})
    tasks = sum(len(a["tasks"]) for a in sub.arrays)
    return {
        "submitted": len(shards),
        "backend": "slurm",
        "job_ids": sub.job_ids,
        "tasks": tasks,
        "sbatch_calls": sub.sbatch_calls,
    }


def launch(
    run: StageRun,
    spec: str,
    cfg: ExecutionConfig,
    *,
    force: bool = False,
    wait: bool = False,
    dependency: str | None = None,
    on_progress: Callable[[], None] | None = None,
    check: Callable[[StageRun, list[int]], None] | None = None,
    prepared: bool = False,
) -> dict[str, Any]:
    """Select shards and run them on the configured backend.

    Before anything runs: the selected shards' inputs must be complete (unless ``dependency`` holds the
    jobs behind their input stage), and ``check(run, shards)`` (the preflight) must not raise.

    ``local`` and ``debug`` block until done (raising on failures). ``slurm`` submits job arrays
    and returns at once unless ``wait``. A blocking launch also waits for the selected shards that an
    earlier job still holds (after a requeue of the job that launches), so that it returns with every
    selected shard done. The submission is recorded for ``status``.
    """
    run = dataclasses.replace(run, max_attempts=cfg.max_attempts, submitted_at=now())
    state = prepare(run, force=force and spec == "all" and not prepared)
    shards, in_flight = select(run, spec, force=force)
    if dependency is None and shards:  # chained behind its input stage, the input is checked by each task
        problems = input_problems(run, shards)
        if problems:
            raise IncompleteInput(run, problems)
    if check is not None and shards:
        check(run, shards)
    if force:
        clear(run, shards)
    labels = [shard_name(k, run.num_shards) for k in shards]
    log_dir = state.root / "logs"
    summary = {"shards": compress_ids(shards), "in_flight": len(in_flight)}
    held = {shard_name(k, run.num_shards) for k in in_flight}  # by an earlier job (e.g. before a requeue)
    if not shards:
        if cfg.backend != "slurm" or wait:
            wait_for(run.out_dir, held)  # a blocking launch returns with every selected shard done
            finalize(run)  # e.g. a stage completed before a finalize step failed
        return {"submitted": 0, "backend": cfg.backend, **summary}
    (run.out_dir / "manifest.json").unlink(missing_ok=True)  # no longer describes the stage
    runner = ShardRunner(run)

    def record(sub: backends.Submission) -> dict[str, Any]:
        return record_submission(state, shards, sub)

    if cfg.backend == "slurm" and not wait:
        sub = backends.submit_arrays(
            PackRunner(runner, strict=True, log_dir=str(log_dir)),  # a failed shard fails its array task
            shards,
            labels,
            cfg=cfg,
            log_dir=log_dir,
            job_name=f"ipt-{run.stage}",
            dependency=dependency,
        )
        return {**record(sub), **summary}
    local = record_submission(state, shards, backend=cfg.backend) if cfg.backend != "slurm" else None
    try:
        run_tasks(
            runner,
            shards,
            labels=labels,
            stage=run.stage,
            cfg=cfg,
            log_dir=log_dir,
            on_progress=on_progress,
            on_submit=record,
            dependency=dependency,
        )
    except TaskFailures as exc:
        from .monitor import resume_command

        raise TaskFailures(run.stage, exc.failures, len(shards), f"resume: {resume_command(run.out_dir)}") from None
    finally:
        if local is not None:
            state.end_submission(local["record"])
    if held:
        wait_for(run.out_dir, held)
        finalize(run)
    return {"submitted": len(shards), "backend": cfg.backend, **summary}
