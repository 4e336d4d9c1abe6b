"""Benchmark the preflight on a stage of 10,000 shards, beside ``status`` of the same stage.

    python tools/bench_preflight.py --shards 10000 --repeats 5

A fake run is built in a temporary folder: RUN/raw with N small shard files, done markers and a
manifest-less stage state (so that every input is checked one by one), RUN/synth with 40% of the
shards done (so that the disk estimate measures the stage's own ratio), and a tiny model folder.
Timed, each the best of ``--repeats``: the input check ``launch`` always runs, the preflight's disk
estimate and room check, the model check, the Slurm check (one ``sinfo``, when Slurm is up), and
``status`` of the synth stage (without the queue) as the yardstick. Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipt_hpc import preflight  # noqa: E402
from ipt_hpc.atomic import write_json_atomic  # noqa: E402
from ipt_hpc.config import load_config  # noqa: E402
from ipt_hpc.execution import StageRun, StageState, shard_name  # noqa: E402
from ipt_hpc.execution.backends import slurm_available  # noqa: E402
from ipt_hpc.execution.monitor import stage_status  # noqa: E402
from ipt_hpc.execution.submit import input_problems, prepare  # noqa: E402


def noop(cfg: Any, ctx: Any) -> dict[str, Any]:
    raise RuntimeError("benchmark shards never run")


def build(root: Path, n: int) -> tuple[StageRun, Path]:
    raw, synth = root / "run" / "raw", root / "run" / "synth"
    raw_state = StageState(raw)
    raw_state.write_stage({"stage": "shard", "num_shards": n, "config_hash": "bench"})
    for k in range(n):
        name = shard_name(k, n)
        (raw / name).write_bytes(b"x" * (1000 + k % 97))
        (raw_state.root / "done").mkdir(exist_ok=True)
        (raw_state.root / "done" / f"{name}.json").write_text("{}")
    run = StageRun("synthesize", str(root / "run"), "synth", "raw", n, noop, {})
    prepare(run)
    state = StageState(synth)
    (state.root / "done").mkdir(exist_ok=True)
    for k in range(0, n, 5):
        for j in (0, 1):
            if k + j < n:
                name = shard_name(k + j, n)
                (synth / name).write_bytes(b"y" * 700)
                (state.root / "done" / f"{name}.json").write_text('{"records": 1}')
    model = root / "model"
    model.mkdir()
    write_json_atomic(model / "config.json", {"model_type": "llama"})
    (model / "model.safetensors").write_bytes(b"")
    return run, model


def best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ipt-bench-preflight-") as tmp:
        t = time.perf_counter()
        run, model = build(Path(tmp), args.shards)
        print(f"built a {args.shards:,}-shard run in {time.perf_counter() - t:.1f} s")
        todo = [k for k in range(args.shards) if k % 5 > 1]
        slurm = slurm_available()
        sets = {"synth.model": str(model), "execution.backend": "slurm" if slurm else "local"}
        cfg = load_config(None, None, sets)
        check = preflight.stage_checker(cfg)
        rows = {
            "input check (launch, always)": best(lambda: input_problems(run, todo), args.repeats),
            "disk estimate + room": best(lambda: check(run, todo), args.repeats),
            "model folder": best(lambda: preflight.stage_models(cfg, "synthesize"), args.repeats),
        }
        if slurm:
            rows["Slurm request (sinfo)"] = best(lambda: preflight.slurm_request(cfg.execution), args.repeats)
        status = best(lambda: stage_status(run.out_dir, use_queue=False), args.repeats)
        total = sum(rows.values())
        print(f"{'part':<32} {'seconds':>9} {'x status':>9}")
        for name, sec in [*rows.items(), ("preflight, all parts", total), ("status of the stage (yardstick)", status)]:
            print(f"{name:<32} {sec:9.4f} {sec / status:9.2f}")
        print(f"{len(todo):,} shards to submit of {args.shards:,}; best of {args.repeats}")


if __name__ == "__main__":
    main()
