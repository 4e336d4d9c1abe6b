"""The per-shard stage contract: what a stage declares, and the one way every stage is launched.

A stage module declares a :class:`Stage` (its name, the folder it reads, the folder it writes, its
per-shard function, the picklable job its tasks get, and an optional finalize step) and nothing else.
:func:`build` turns it into the :class:`StageRun` of one run folder: it reads the shard count from the
input stage (or takes it from the pipeline, which submits a stage before its input exists). :func:`run_stage`
launches it on the configured backend through :func:`~.submit.launch`, which checks that the input is
complete, writes markers, manifests and totals, and records the submission. The CLI, the pipeline and the
tests all go through these two functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import IptError
from ..layout import RunLayout
from .shards import ShardContext, StageRun, record_options
from .state import StageState
from .submit import launch, prepare

Folder = Callable[[Config, RunLayout], Path]


@dataclass(frozen=True)
class Stage:
    """A per-shard stage, as its module declares it.

    ``job(cfg, layout)`` builds the picklable configuration its shard tasks receive (it raises
    :class:`IptError` on a config the stage cannot run); ``shard_fn(job, ctx)`` processes one shard and
    returns its stats; ``finalize(run)`` runs once after the last shard (default: a manifest with totals).
    """

    name: str
    upstream: str  # what writes the input, for the error when it is missing ("shard", "synthesize", ...)
    input: Folder | None  # None: the stage makes shards from outside the run (``shard``)
    output: Folder  # a folder of the run, or one outside it (``publish --out DIR``: stored absolute)
    shard_fn: Callable[[Any, ShardContext], dict[str, Any]]
    job: Callable[[Config, RunLayout], Any]
    finalize: Callable[[StageRun], dict[str, Any]] | None = None
    out_suffix: str = ".jsonl.zst"  # the file whose existence completes a shard
    count: Callable[[Config], int] | None = None  # the shard count of a stage without an input stage
    # a coordinator step run before the shards, in the launching process: plan(run, cfg, progress)
    plan: Callable[[StageRun, Config, Callable[[str, int, int], None] | None], None] | None = None


def build(stage: Stage, cfg: Config, run_dir: str | Path, num_shards: int | None = None) -> StageRun:
    """``stage`` for the run folder ``run_dir``; ``num_shards`` only when its input does not exist yet."""
    layout = RunLayout.of(run_dir)
    in_dir, out_dir = stage.input(cfg, layout) if stage.input else layout.root, stage.output(cfg, layout)
    if num_shards is None and stage.count is not None:
        num_shards = stage.count(cfg)
    if num_shards is None:
        info = StageState(in_dir).read_stage()
        if info is None:
            raise IptError(f"{stage.name}: {in_dir} holds no stage output; run {stage.upstream} first")
        num_shards = int(info["num_shards"])
    job = stage.job(cfg, layout)
    return StageRun(
        stage=stage.name,
        run_dir=str(layout.root),
        out_folder=_folder_of(out_dir, layout.root),
        in_folder=str(in_dir.relative_to(layout.root)) if stage.input else "",
        num_shards=num_shards,
        shard_fn=stage.shard_fn,
        stage_config=job,
        out_suffix=stage.out_suffix,
        finalize_fn=stage.finalize,
        **record_options(cfg.records),
    )


def _folder_of(out_dir: Path, root: Path) -> str:
    """The output folder as a :class:`StageRun` stores it: relative to the run folder, or absolute when the
    stage writes outside the run (``publish --out DIR``), which ``run_dir / out_folder`` then yields as is."""
    if out_dir.is_relative_to(root):
        return str(out_dir.relative_to(root))
    return str(out_dir.resolve())


def run_stage(
    stage: Stage,
    cfg: Config,
    run_dir: str | Path,
    spec: str = "all",
    *,
    force: bool = False,
    wait: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    check: Callable[[StageRun, list[int]], None] | None = None,
) -> dict[str, Any]:
    """Run (local, debug) or submit (slurm) the shards of ``stage`` that ``spec`` selects.

    ``progress(stage, shards_done, shards)`` is called as shards finish; ``check(run, shards)`` is the
    preflight, run before anything starts. The result holds the stage's manifest once it is complete.
    """
    run = build(stage, cfg, run_dir)
    state = StageState(run.out_dir)
    if stage.plan is not None:  # the stage folder is checked (or wiped with force) before the plan writes to it
        prepare(run, force=force and spec == "all")
        stage.plan(run, cfg, progress)
    on_progress = progress and (lambda: progress(stage.name, len(state.names("done")), run.num_shards))
    result = launch(
        run,
        spec,
        cfg.execution,
        force=force,
        wait=wait,
        on_progress=on_progress,
        check=check,
        prepared=stage.plan is not None,
    )
    manifest = run.out_dir / "manifest.json"  # written by the task that finished the last shard
    if manifest.exists():
        from ..atomic import read_json

        result["manifest"] = read_json(manifest)
    return result
