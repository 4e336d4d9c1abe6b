"""``plan``: GPU-hours, array layout, disk and wall time per stage before submitting, from a calibration."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from . import render
from .common import config_options, flag, load, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "plan",
        run,
        help="cost, array layout, disk and wall time per stage, before submitting (from a calibration)",
        description="Estimate every stage of the config's pipeline: work (documents, tokens), GPU- and CPU-hours,"
        " the Slurm array layout (shards per task fitting time_min, arrays and sbatch calls from MaxArraySize,"
        " throttle), output size on disk and wall time at execution.parallelism, with a total and, when"
        " plan.gpu_hour_price/cpu_hour_price are set, the cost. Figures come from --calibrate N: the real stages"
        " run on N sample documents with the configured engine and executor (on Slurm, one job on the target"
        " partition). Later plans reuse the stored calibration. The plan is kept as RUN/plan.json; status and"
        " the report set it beside what ran. Nothing is submitted.",
        epilog="examples:\n  python -m ipt_hpc.launch plan --config configs/demo.yaml --run runs/demo --calibrate 40\n"
        "  python -m ipt_hpc.launch plan --config configs/demo.yaml --run runs/demo --executor slurm"
        " --set shard.num_shards=10000 --parallelism 200\n"
        "  python -m ipt_hpc.launch plan --config configs/refinedweb.yaml --run /scratch/rw --docs 968000000 --json",
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder (the plan is stored in it)")
    p.add_argument("--calibrate", type=int, metavar="N", help="calibrate on N sample documents first")
    p.add_argument("--docs", type=int, metavar="N", help="the corpus's document count, if known (else estimated)")
    p.add_argument(
        "--doctor", metavar="FILE", help="training tokens/s from this doctor --gpu report (its MFU, this model's FLOPs)"
    )
    p.add_argument("--json", action="store_true", help="the plan as JSON on stdout")
    config_options(p, "YAML config (see configs/)", "override any config field, e.g. --set shard.num_shards=1000")
    flag(p, "--executor", key="execution.backend", choices=["local", "slurm", "debug"], help="where tasks would run")
    flag(p, "--workers", key="execution.workers", type=int, metavar="N")
    flag(p, "--partition", key="execution.slurm.partition", help="Slurm partition (execution.slurm.partition)")
    flag(p, "--parallelism", key="execution.parallelism", type=int, metavar="P")


def run(args: argparse.Namespace) -> int:
    from ..planning import plan

    cfg = load(args)
    say = render.stderr_log if args.json else render.console().print
    with _stdout_to_stderr(args.json):  # --json: stdout holds the plan alone, whatever the calibration prints
        result = plan(cfg, args.run, calibrate_docs=args.calibrate, docs=args.docs, doctor=args.doctor, say=say)
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    from rich.console import Console

    show(Console(width=None if sys.stdout.isatty() else 160), result)
    return 0


@contextlib.contextmanager
def _stdout_to_stderr(on: bool) -> Iterator[None]:
    """File descriptor 1 pointed at 2 while on (so that child processes, torchrun's ranks, follow)."""
    if not on:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


WORK = {"records": "records", "input_tokens": "tokens in", "output_tokens": "tokens out", "train_tokens": "tokens"}


def show(console: Any, result: dict[str, Any]) -> None:
    """The plan as a table, its layout notes and where its figures come from."""
    from ..planning.compare import fmt_bytes, fmt_seconds
    from ..planning.estimate import MEASURED

    cur = result["currency"]
    priced = "cost" in result["total"]
    rows = []
    for s in result["stages"]:
        lay = s["layout"]
        work = ", ".join(f"{WORK.get(k, k)} {v:,}" for k, v in s["work"].items()) or "-"
        shape = (
            f"{lay['shards']:,} shards, {lay['shards_per_task']}/task, {lay['tasks']:,} tasks"
            + (f", {lay['arrays']} array(s)" if lay.get("arrays") else "")
            if "shards" in lay
            else lay["note"]
        )
        rows.append(
            (
                s["stage"],
                work,
                f"{s['gpu_hours']:,.2f}",
                f"{s['cpu_hours']:,.2f}",
                shape,
                fmt_bytes(s["output_bytes"]),
                fmt_seconds(s["wall_s"]),
                f"±{s['uncertainty']:.0%}",
                *([f"{s['cost']:,.2f}"] if priced else []),
            )
        )
    t = result["total"]
    rows.append(
        (
            "[bold]total",
            "",
            f"{t['gpu_hours']:,.2f}",
            f"{t['cpu_hours']:,.2f}",
            "",
            fmt_bytes(t["output_bytes"]),
            fmt_seconds(t["wall_s"]),
            "",
            *([f"{t['cost']:,.2f} {cur}"] if priced else []),
        )
    )
    columns = ("stage", "work", "GPU-h", "CPU-h", "layout", "disk", "wall", "±", *(["cost"] if priced else []))
    title = f"plan: {result['docs']:,} documents, {result['shards']:,} shards on {result['backend']}"
    console.print(render.table(title, columns, rows, left=2))
    console.print(f"documents: {result['docs_source']}")
    if result["max_array_size"]:
        console.print(f"MaxArraySize {result['max_array_size']:,}: {result['max_array_source']}")
    for s in result["stages"]:
        note = s["layout"].get("note") if "shards" in s["layout"] else None
        console.print(f"{s['stage']}: {s['source']}" + (f"; {note}" if note else ""))
        if s.get("measured"):
            console.print("  measured: " + ", ".join(f"{MEASURED[k]} {v:,.4g}" for k, v in s["measured"].items()))
        for extra in s.get("notes", []):
            console.print(f"  [yellow]{extra}")
    if result.get("queue_wait"):
        console.print(f"queue wait: {result['queue_wait']}")
    console.print("±: one standard error of the per-document mean the stage scales by (sample spread / sqrt(n))")
