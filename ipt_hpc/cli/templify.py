"""``templify``: synthesized records -> instruction-augmented pre-training texts (+ unconverted raw texts)."""

from __future__ import annotations

import argparse
from typing import Any

from . import render
from .common import common, flag, run_stage_command, shard_options, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "templify",
        run,
        help="synthesized records -> instruction-augmented pre-training texts (+ unconverted raw texts)",
        description="Rebuild each shard's few-shot chains and render them as pre-training texts in formats drawn"
        " per record (deterministic by id and seed); writes RUN/augmented/shard-NNNNN.jsonl.zst with a 'group'"
        " field per record (augmented or raw), a manifest with format stats and two PNG charts.",
        epilog="examples:\n  python -m ipt_hpc.launch templify --run runs/demo\n"
        "  python -m ipt_hpc.launch templify --run /scratch/rw --executor slurm --shards-per-task 64\n"
        "  python -m ipt_hpc.launch tokenize --run runs/demo --input-stage augmented --record-group raw"
        " --tokenizer tok/",
    )
    p.add_argument("--run", metavar="RUN", required=True)
    flag(p, "--input-stage", key="templify.input_stage", metavar="FOLDER")
    flag(p, "--seed", key="templify.seed", type=int)
    shard_options(p)
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..stages import templify

    rc, result, out = run_stage_command(args, templify.STAGE, _describe)
    m = result and result["manifest"]
    if m:
        t, charts = m["totals"], ", ".join(str(out / c) for c in m["charts"])
        render.console().print(
            f"{t['augmented_texts']:,} augmented texts ({t['pairs']:,} pairs; {t['pairs_dropped']:,} malformed dropped)"
            f", {t['texts_without_pairs']:,} plain, {t['raw_texts']:,} raw; layouts: "
            + ", ".join(f"{k} {v:.1%}" for k, v in t["layouts"].items())
            + f"; charts: {charts or 'none (matplotlib missing)'}"
        )
    return rc


def _describe(stage: Any, cfg: Any) -> list[str]:
    job = stage.stage_config
    return [
        f"templify {stage.num_shards} shards of {stage.in_dir} -> {stage.out_dir} (seed {job.seed},"
        f" unconverted documents from {job.raw_stage or 'nowhere'}) on {cfg.execution.backend}"
    ]
