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

    from ..status import run_status

    report = run_status(args.run, use_queue=not args.no_queue)
    if not report["stages"]:
        raise IptError(f"{args.run}: no stage output found (no */_state/stage.json)")
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
    render.print_failures(console, report)
    return 0


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
