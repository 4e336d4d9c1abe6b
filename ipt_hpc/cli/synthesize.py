"""``synthesize``: raw shards -> instruction-response pairs per document (the paper's multi-round synthesis)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import common, flag, run_stage_command, shard_options, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "synthesize",
        run,
        help="raw shards -> instruction-response pairs per document (the paper's multi-round synthesis)",
        description="Run the instruction synthesizer over RUN/raw with the paper's M-round few-shot procedure;"
        " writes RUN/synth/shard-NNNNN.jsonl.zst, resumable at record granularity.",
        epilog="examples:\n  python -m ipt_hpc.launch synthesize --run runs/demo --model models/tiny-synthesizer\n"
        "  python -m ipt_hpc.launch synthesize --run /scratch/rw --model instruction-pretrain/instruction-synthesizer"
        " --backend vllm --executor slurm --shards-per-task 16 --parallelism 64 --set execution.slurm.gpus_per_node=1\n"
        "  python -m ipt_hpc.launch synthesize --run /scratch/rw --model instruction-pretrain/instruction-synthesizer"
        " --backend server --server-url http://gpu-node-07:8000 --executor slurm  # a shared served model\n"
        "  python -m ipt_hpc.launch synthesize --run /scratch/rw --shards failed --executor slurm",
    )
    p.add_argument("--run", metavar="RUN", required=True)
    flag(p, "--model", key="synth.model", metavar="PATH_OR_NAME")
    flag(p, "--backend", key="synth.backend", choices=["transformers", "vllm", "server"], help="synth.backend")
    flag(p, "--server-url", key="synth.server.url", metavar="URL", help="backend server: a running server")
    shard_options(p)
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..stages import synthesize

    return run_stage_command(args, synthesize.STAGE, _describe)[0]


def _describe(run: Any, cfg: Any) -> list[str]:
    job = run.stage_config
    backend = job.backend
    if backend == "server":
        backend = f"server {job.server.url}" if job.server.url else "a vLLM server launched in each task"
    line = f"synthesize {run.num_shards} shards of {run.in_dir} with {job.model} ({backend}), {job.rounds}"
    line += f" rounds, max_new_tokens {job.max_new_tokens}, max_model_len {job.max_model_len}, converting"
    return [f"{line} {job.convert_share:.0%} of documents, on {cfg.execution.backend}"]
