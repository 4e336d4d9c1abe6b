"""``pipeline``: every available stage at once, chained with Slurm afterok dependencies (or run here in order)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import render
from .common import common, load, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "pipeline",
        run,
        help="submit every available stage at once, chained with Slurm afterok dependencies",
        description="Submit (Slurm) or run (local) every stage the config asks for, in order: shard; synthesize and"
        " templify (synth.model set); tokenize per record group and the mixture (tokenize.tokenizer set); train,"
        " export and eval (the config has a train section); the report. On Slurm each stage waits for the"
        " previous one (afterok); a failed stage cancels the rest.",
        epilog="examples:\n  python -m ipt_hpc.launch pipeline --config configs/demo.yaml --run runs/demo\n"
        "  python -m ipt_hpc.launch pipeline --config configs/refinedweb.yaml --run /scratch/rw"
        " --executor slurm --partition cpu\n  python -m ipt_hpc.launch status --run /scratch/rw",
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder")
    p.add_argument(
        "--wait", action="store_true", help="with --executor slurm: wait for the chain, then say how it ended"
    )
    g = p.add_argument_group("plan first")
    g.add_argument(
        "--plan", action="store_true", help="print the plan (see the plan command) and ask before submitting"
    )
    g.add_argument("--calibrate", type=int, metavar="N", help="with --plan: calibrate on N sample documents first")
    g.add_argument("--yes", action="store_true", help="with --plan: submit without asking")
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import Coordinator, Job, ShardStage, available_steps, run_here, submit

    cfg = load(args)
    steps = available_steps(cfg, args.run)
    console = render.console()
    if args.dry_run:
        lines = []
        for i, step in enumerate(steps):
            kind = "one job" if isinstance(step, (Coordinator, Job)) else "job arrays"
            after = f", after step {i}" if i and cfg.execution.backend == "slurm" else ""
            lines.append(f"step {i + 1}: {step.name} ({kind} on {cfg.execution.backend}{after})")
        return render.dry_run(console, lines)
    if args.plan and not _planned(console, cfg, args):
        console.print("not submitted")
        return 1
    if not args.skip_preflight:
        from .. import preflight

        preflight.pipeline(cfg, args.run, steps)
    if cfg.execution.backend == "slurm":
        submitted = submit(steps, cfg.execution, args.run)
        console.print(submissions_table(submitted))
        if not args.wait:
            console.print(f"submitted; follow with: python -m ipt_hpc.launch status --run {args.run}")
            return 0
        return _wait(console, args.run, [j for r in submitted for j in r.get("job_ids", [])])
    started = time.time()
    update: list[Any] = [None]  # the progress display of the step that runs

    @contextmanager
    def on_step(i: int, step: Any) -> Iterator[None]:
        console.rule(f"[bold]step {i + 1}/{len(steps)}: {step.name}")
        t = time.time()
        if isinstance(step, ShardStage):
            prog, update[0] = render.progress_reporter(console)
            with prog:
                yield
        else:
            yield
        console.print(f"{step.name}: done in {time.time() - t:,.1f} s")

    run_here(steps, cfg.execution, args.run, on_step=on_step, progress=lambda *a: update[0](*a))
    _print_outputs(console, args.run, time.time() - started)
    return 0


def _planned(console: Any, cfg: Any, args: argparse.Namespace) -> bool:
    """``--plan``: show the plan, then whether to go on (``--yes``, or the answer at the terminal)."""
    import sys

    from ..errors import IptError
    from ..planning import plan
    from .plan import show

    show(console, plan(cfg, args.run, calibrate_docs=args.calibrate, say=console.print))
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise IptError("pipeline --plan: no terminal to ask for confirmation; add --yes to submit after the plan")
    return input("submit this pipeline? [y/N] ").strip().lower() in ("y", "yes")


def _wait(console: Any, run_dir: str, job_ids: list[str]) -> int:
    """``pipeline --wait`` on Slurm: wait until every job left the queue, then say how it ended."""
    from ..execution.backends import wait_for_jobs
    from ..pipeline import verdict

    started = time.time()
    console.print(f"waiting for {len(job_ids)} Slurm jobs (Ctrl-C stops waiting, not the jobs)")
    wait_for_jobs(job_ids, poll_s=5.0)
    finished, message, report = verdict(run_dir, started)
    if report["root_cause"]:
        console.print(f"[bold red]pipeline failed[/] after {time.time() - started:,.0f} s; {message}")
        render.print_failures(console, report)
        return 1
    if not finished:
        console.print(f"[bold red]pipeline did not finish[/]: {message}")
        return 1
    _print_outputs(console, run_dir, time.time() - started)
    return 0


def _print_outputs(console: Any, run_dir: str, seconds: float) -> None:
    from ..pipeline import outputs

    rows = [(what, str(path)) for what, path in outputs(run_dir)]
    title = f"pipeline finished in {seconds / 60:,.1f} min: where everything lies"
    console.print(render.table(title, ("what", "path"), rows, left=2))


def submissions_table(results: list[dict[str, Any]]) -> Any:
    """What ``pipeline --executor slurm`` submitted: per step its job ids, array tasks (the shards they
    hold), nodes per task and the dependency it waits on. A step with nothing to do shows ``-``."""

    def row(r: dict[str, Any]) -> tuple[str, ...]:
        ids = r.get("job_ids") or []
        tasks = r.get("tasks", len(ids))
        shards = r.get("submitted")
        tasks_text = f"{tasks} ({shards} shards)" if shards is not None and shards != tasks else str(tasks)
        return (
            r["step"],
            ", ".join(ids) or "-",
            tasks_text if ids else "-",
            str(r.get("nodes", 1)) if ids else "-",
            r.get("dependency") or "-",
        )

    return render.table("submitted", ("step", "job ids", "tasks", "nodes", "dependency"), map(row, results), left=2)
