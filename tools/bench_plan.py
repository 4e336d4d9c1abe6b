#!/usr/bin/env python3
"""How close the plan comes: ``plan --calibrate N`` on a config, then its pipeline in the same run folder,
then each stage's predicted wall time and output size beside the measured ones (actual/plan ratios).
Optionally, the time to plan 10,000 shards on the local Slurm cluster (nothing submitted).

    python tools/bench_plan.py --config configs/demo.yaml --calibrate 40 --run /tmp/bench-plan
    python tools/bench_plan.py --config configs/demo.yaml --run /tmp/bench-plan --slurm-shards 10000 --skip-run
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cli(*args: str) -> float:
    """Run ``python -m ipt_hpc.launch ARGS`` (output to a log beside the run); its wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ipt_hpc.launch", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--run", default="/tmp/bench-plan")
    ap.add_argument("--calibrate", type=int, default=40)
    ap.add_argument("--tolerance", type=float, default=0.35)
    ap.add_argument("--skip-run", action="store_true", help="reuse the run folder's plan and pipeline output")
    ap.add_argument("--slurm-shards", type=int, default=0, help="also time a plan of this many shards on Slurm")
    args = ap.parse_args()

    from ipt_hpc.planning.compare import fmt_bytes, fmt_seconds, ratio, rows

    run = Path(args.run)
    if not args.skip_run:
        shutil.rmtree(run, ignore_errors=True)
        t_plan = cli("plan", "--config", args.config, "--run", str(run), "--calibrate", str(args.calibrate))
        t_run = cli("pipeline", "--config", args.config, "--run", str(run))
        print(f"plan --calibrate {args.calibrate}: {t_plan:,.1f} s; pipeline: {t_run:,.1f} s ({t_plan / t_run:.2f}x)")
    print(f"{'stage':<20} {'plan wall':>10} {'actual':>10} {'ratio':>6} {'plan size':>10} {'actual':>10} {'ratio':>6}")
    inside = []
    for row in rows(run):
        w = ratio(row["actual_wall_s"], row["planned_wall_s"])
        b = ratio(row["actual_bytes"], row["planned_bytes"])
        print(
            f"{row['stage']:<20} {fmt_seconds(row['planned_wall_s']):>10} {fmt_seconds(row['actual_wall_s']):>10}"
            f" {'-' if w is None else f'{w:.2f}':>6} {fmt_bytes(row['planned_bytes']):>10}"
            f" {fmt_bytes(row['actual_bytes']):>10} {'-' if b is None else f'{b:.2f}':>6}"
        )
        if row["shards"] is not None:  # the data stages: the tolerance of the issue
            inside += [abs(x - 1) <= args.tolerance for x in (w, b) if x is not None]
    print(f"data stages within ±{args.tolerance:.0%}: {sum(inside)}/{len(inside)} figures")
    if args.slurm_shards:
        t = cli(
            "plan", "--config", args.config, "--run", str(run), "--executor", "slurm",
            "--set", f"shard.num_shards={args.slurm_shards}", "--json",
        )  # fmt: skip
        t_help = cli("--version")
        print(
            f"plan of {args.slurm_shards:,} shards on Slurm: {t:,.2f} s as a command"
            f" ({t / t_help:.1f}x the command's bare start, {t_help:.2f} s); nothing submitted"
        )


if __name__ == "__main__":
    main()
