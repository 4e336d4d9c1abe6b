"""``tokenize``: zstd JSONL shards -> Megatron indexed datasets (.bin/.idx), merged per group."""

from __future__ import annotations

import argparse
from typing import Any

from . import render
from .common import common, flag, run_stage_command, shard_options, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "tokenize",
        run,
        help="zstd JSONL shards -> Megatron indexed datasets (.bin/.idx), merged per group",
        description="Tokenize a stage's shards with a Hugging Face fast tokenizer into Megatron indexed datasets"
        " (RUN/tokens/GROUP/shard-NNNNN.{bin,idx}), then merge them into RUN/tokens/GROUP.{bin,idx}.",
        epilog="examples:\n  python -m ipt_hpc.launch tokenize --run runs/demo --input-stage raw --tokenizer tok/\n"
        "  python -m ipt_hpc.launch tokenize --run /scratch/rw --input-stage augmented --tokenizer"
        " meta-llama/Llama-2-7b-hf --executor slurm --shards-per-task 8\n"
        "  python -m ipt_hpc.launch merge --run /scratch/rw --group augmented   # after the Slurm arrays",
    )
    p.add_argument("--run", metavar="RUN", required=True)
    flag(p, "--input-stage", key="tokenize.input_stage", metavar="FOLDER")
    flag(p, "--tokenizer", key="tokenize.tokenizer", metavar="PATH_OR_NAME")
    flag(p, "--group", key="tokenize.group", metavar="NAME",
         help="output group (default: --record-group, else the input stage)")  # fmt: skip
    flag(p, "--record-group", key="tokenize.record_group", metavar="NAME")
    shard_options(p, wait_help="with --executor slurm: wait, then merge")
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..stages import tokenize

    rc, result, _ = run_stage_command(args, tokenize.STAGE, _describe, prepare_dry_run=False, follow=False)
    merged = result and result["manifest"]
    console = render.console()
    if merged:
        rate = sum(s.get("tokens_per_s") or 0 for s in merged["shards"]) / max(1, len(merged["shards"]))
        console.print(
            f"{merged['dataset']}.{{bin,idx}}: {merged['documents']:,} documents, {merged['tokens']:,} tokens"
            f" (mean {merged['mean_length']}), {rate:,.0f} tokens/s per shard task"
        )
    elif result is not None and result["backend"] == "slurm":
        console.print(f"follow with: python -m ipt_hpc.launch status --run {args.run}; then merge")
    return rc


def _describe(stage: Any, cfg: Any) -> list[str]:
    job = stage.stage_config
    return [
        f"tokenize {stage.num_shards} shards of {stage.in_dir} -> {stage.out_dir} on {cfg.execution.backend}",
        f"dtype {job.dtype}, BOS {job.bos_id}, EOD {job.eod_id}, {job.workers} tokenizer processes",
    ]
