"""``status``: shards done / running / pending / failed per stage, with throughput and ETA."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import IptError
from . import render
from .common import subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "status",
        run,
        help="shards done / running / pending / failed per stage, with throughput and ETA",
        description="Report every stage of a run from its completion markers and the Slurm queue.",
        epilog="examples:\n  python -m ipt_hpc.launch status --run runs/demo\n"
        "  python -m ipt_hpc.launch status --run runs/demo --json | jq '.stages[].counts'",
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder (or one stage folder)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-queue", action="store_true", help="do not ask Slurm (markers only)")
    p.add_argument("--shards", action="store_true", help="list every shard's state (with --json)")


def run(args: argparse.Namespace) -> int:
    import orjson

    from ..stages.decontam_index import DECONTAMINATION_HEADERS, decontamination_rows
    from ..status import run_status

    report = run_status(args.run, use_queue=not args.no_queue)
    decontamination = decontamination_rows(args.run)
    if decontamination:
        report["decontamination"] = [dict(zip(DECONTAMINATION_HEADERS, r, strict=True)) for r in decontamination]
    if not report["stages"]:
        raise IptError(f"{args.run}: no stage output found (no */_state/stage.json)")
    plan = _plan_rows(args.run, report)
    if plan:
        report["plan"] = plan
    if args.json:
        if not args.shards:
            for st in report["stages"]:
                st.pop("shards")
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    from rich.console import Console

    columns = ("stage", "shards", "done", "running", "pending", "failed", "never", "records", "tokens", "rec/s", "ETA")
    rows = [_row(st) for st in report["stages"]]
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(render.table(f"status of {args.run}", columns, rows))
    if plan:
        console.print(_plan_table(plan))
    if decontamination:  # the eval tasks' documents found in the training texts (docs/decontamination.md)
        console.print(render.table("decontamination", DECONTAMINATION_HEADERS, decontamination, left=3))
    render.print_failures(console, report)
    return 0


def _plan_rows(run: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's rows (RUN/plan.json) with each stage's progress and its ETA from the measured rate."""
    from ..planning.compare import rows

    eta = {st["name"]: st["eta_s"] for st in report["stages"]}
    return [{**row, "eta_s": eta.get(row["stage"])} for row in rows(run)]


def _plan_table(plan: list[dict[str, Any]]) -> Any:
    from ..planning.compare import fmt_bytes, fmt_seconds

    columns = ("stage", "progress", "planned wall", "actual wall", "ETA (measured rate)", "planned size", "actual size")
    out = []
    for row in plan:
        progress = f"{row['shards_done']}/{row['shards']}" if row["shards"] else "-"
        out.append(
            (
                row["stage"],
                progress,
                fmt_seconds(row["planned_wall_s"]),
                fmt_seconds(row["actual_wall_s"]),
                fmt_seconds(row["eta_s"]),
                fmt_bytes(row["planned_bytes"]),
                fmt_bytes(row["actual_bytes"]),
            )
        )
    return render.table("plan vs actual (RUN/plan.json)", columns, out)


def _row(st: dict[str, Any]) -> tuple[str, ...]:
    c = st["counts"]
    return (
        st["name"],
        str(st["num_shards"]),
        f"[green]{c['done']}",
        str(c["running"]),
        str(c["pending"]),
        f"[red]{c['failed']}" if c["failed"] else "0",
        str(c["never_submitted"]),
        f"{st['records']:,}",
        f"{st['tokens']:,}",
        "-" if st["records_per_s"] is None else f"{st['records_per_s']:,.1f}",
        "-" if st["eta_s"] is None else time.strftime("%H:%M:%S", time.gmtime(st["eta_s"])),
    )
