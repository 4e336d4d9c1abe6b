"""``decontaminate``: the eval benchmarks' documents out of a stage's training texts, every action logged."""

from __future__ import annotations

import argparse
from typing import Any

from . import render
from .common import common, flag, run_stage_command, shard_options, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "decontaminate",
        run,
        help="remove the eval tasks' documents (13-gram matches) from raw or synthesized shards",
        description="Build the run's n-gram index of the eval tasks' documents once (lm-eval's tasks, from the local"
        " datasets cache, plus decontaminate.references), then scan every record of a stage and apply its group's"
        " policy (flag, drop_pair, excise, drop_doc). Writes RUN/<input>-clean/shard-NNNNN.jsonl.zst, a log line per"
        " action in RUN/<input>-clean/decontamination/, and per task the training records hit and removed and the"
        " share of the benchmark's documents found (manifest.json). docs/decontamination.md.",
        epilog="examples:\n"
        "  python -m ipt_hpc.launch decontaminate --run runs/demo   # raw -> raw-clean, before synthesis\n"
        "  python -m ipt_hpc.launch decontaminate --run runs/demo --input-stage synth   # pairs -> synth-clean\n"
        "  python -m ipt_hpc.launch decontaminate --run /scratch/rw --executor slurm --shards-per-task 16",
    )
    p.add_argument("--run", metavar="RUN", required=True)
    flag(p, "--input-stage", key="decontaminate.input_stage", metavar="FOLDER")
    flag(p, "--output-folder", key="decontaminate.output_folder", metavar="FOLDER")
    flag(p, "--tasks", key="decontaminate.tasks", metavar="T1,T2", convert=lambda v: [t for t in v.split(",") if t])
    shard_options(p)
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..stages import decontaminate

    rc, result, out = run_stage_command(args, decontaminate.STAGE, _describe)
    m = result and result["manifest"]
    if m:
        t = m["totals"]
        console = render.console()
        console.print(
            f"{t['records_in']:,} records in, {t['records_out']:,} out: {t['records_hit']:,} hit,"
            f" {t['records_dropped']:,} dropped, {t['records_excised']:,} excised, {t['pairs_dropped']:,} pairs"
            f" dropped; index: {m['index']['ngrams']:,} n-grams; log: {out / decontaminate.LOG_FOLDER}"
        )
        rows = [
            (task, f"{r['training_records_hit']:,}", f"{r['removed']:,}", f"{r['eval_docs_hit']:,}/{r['eval_docs']:,}")
            for task, r in m["tasks"].items()
        ]
        console.print(render.table("eval tasks", ("task", "records hit", "removed", "eval docs hit"), rows))
    return rc


def _describe(stage: Any, cfg: Any) -> list[str]:
    job = stage.stage_config
    s = cfg.decontaminate
    return [
        f"decontaminate {stage.num_shards} shards of {stage.in_dir} -> {stage.out_dir} on {cfg.execution.backend}",
        f"group {job.group}: policy {job.policy}; {s.n}-grams of {', '.join(job.index_of['tasks']) or 'no task'}"
        + (f" and {len(s.references)} reference file(s)" if s.references else "")
        + f"; index in {job.index}",
    ]
