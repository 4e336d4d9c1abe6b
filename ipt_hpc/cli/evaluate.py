"""``eval``: lm-evaluation-harness on a Hugging Face model, as the InstructLM model card runs it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import IptError
from . import render
from .common import config_options, flag, load, subcommand

EPILOG = """\
examples:
  # the model card's two task groups on an exported model (results in RUN/eval/)
  python -m ipt_hpc.launch eval --model RUN/hf

  # the same as one Slurm GPU job; --dry-run shows the lm-eval calls and the job first
  python -m ipt_hpc.launch eval --model RUN/hf --executor slurm --partition gpu --dry-run

  # on a login node with network: fill the HF datasets cache the compute nodes read
  HF_HOME=/shared/hf python -m ipt_hpc.launch eval --prefetch

  # a custom task from local YAML + data files (air-gapped clusters), 50 documents
  python -m ipt_hpc.launch eval --model RUN/hf --tasks my_mc --include-path tasks/ --limit 50
"""


def _count_or_share(value: float) -> int | float:
    """``--limit``: a number of documents (an int) from 1 up, a share of them below."""
    return int(value) if value >= 1 else value


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "eval",
        run,
        help="lm-evaluation-harness on a Hugging Face model, as the InstructLM model card runs it",
        description="Run lm-eval (add_bos_token=True, greedy, batch size auto) on the model card's task groups:"
        " zero_shot (piqa, hellaswag, winogrande; 0-shot) and five_shot (social_iqa, ai2_arc, openbookqa, boolq,"
        " mmlu; 5-shot). Writes RUN/eval/<group>.json (lm-eval's JSON), manifest.json and results.md (our scores"
        " next to the paper's). Every dataset is loaded before the model: an uncached dataset on an offline node"
        " stops the run with the dataset's name and the command that downloads it.",
        epilog=EPILOG,
    )
    flag(p, "--model", key="eval.model", metavar="PATH_OR_NAME")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--run", metavar="RUN", help="run folder; output goes to RUN/eval (default: the model's parent)")
    flag(dest, "--out", key="eval.out", metavar="DIR")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--groups", metavar="A,B", help="configured groups to run (default: all: zero_shot,five_shot)")
    what.add_argument("--tasks", metavar="T1,T2", help="run these lm-eval tasks as one group 'tasks' instead")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="with --tasks: few-shot examples (default: task's)")
    flag(p, "--include-path", key="eval.include_path", metavar="DIR", action="append",
         help="folder of custom task YAMLs (repeatable)")  # fmt: skip
    flag(p, "--limit", key="eval.limit", convert=_count_or_share, type=float, metavar="N")
    flag(p, "--batch-size", key="eval.batch_size", metavar="B")
    flag(p, "--dtype", key="eval.dtype", help="model dtype (eval.dtype; model card: float16; float32 on CPU)")
    flag(p, "--device", key="eval.device")
    p.add_argument("--prefetch", action="store_true", help="only download the tasks' datasets into the HF cache")
    g = p.add_argument_group("configuration and execution")
    config_options(g, "YAML config (see configs/); validated on load", "e.g. --set eval.seed=[1,2,3,4]")
    flag(g, "--executor", key="execution.backend", choices=["local", "slurm", "debug"],
         help="local: here; slurm: one GPU job")  # fmt: skip
    flag(g, "--partition", key="execution.slurm.partition", help="Slurm partition (execution.slurm.partition)")
    g.add_argument("--force", action="store_true", help="re-evaluate groups that are done")
    g.add_argument("--dry-run", action="store_true", help="print the lm-eval calls (and the Slurm job) and exit")


def run(args: argparse.Namespace) -> int:
    from ..model import evaluate

    groups = [g for g in args.groups.split(",") if g] if args.groups else None
    extra = {}
    if args.tasks:
        tasks = [t for t in args.tasks.split(",") if t]
        extra["eval.groups"] = {"tasks": {"tasks": tasks, "num_fewshot": args.num_fewshot}}
    elif args.num_fewshot is not None:
        raise IptError("eval: --num-fewshot goes with --tasks (a group's shots are set in eval.groups)")
    cfg = load(args, extra)
    console = render.console()
    if args.prefetch:
        for ds in evaluate.prefetch(cfg.eval, groups):
            console.print(f"cached: {ds.describe()} ({len(ds.tasks)} task(s))")
        import datasets

        console.print(f"datasets cache: {datasets.config.HF_DATASETS_CACHE}")
        return 0
    plans = evaluate.plan(cfg.eval, groups)
    out = evaluate.output_dir(cfg.eval, args.run)
    if args.dry_run:
        return render.dry_run(console, _plan_lines(cfg, plans, out))
    if cfg.execution.backend == "slurm":
        job = evaluate.submit(cfg.eval, cfg.execution, out, groups, args.force)
        console.print(f"submitted Slurm job {job}; results will be in {out / 'results.md'}")
        return 0
    result = evaluate.run(cfg.eval, out, groups, args.force, log_fn=console.print)
    sys.stdout.write(Path(result["table"]).read_text(encoding="utf-8"))
    return 0


def _plan_lines(cfg: Any, plans: list[Any], out: Path) -> list[str]:
    from ..model import evaluate

    execution = evaluate.job_execution(cfg.execution)
    lines = [f"eval {cfg.eval.model} -> {out} on {execution.backend}"]
    for p in plans:
        lines.append(f"group {p.name}: {', '.join(p.tasks)} (num_fewshot {p.num_fewshot})")
        lines.append(render.Whole(f"  {p.lm_eval_command(cfg.eval)}"))
    if execution.backend == "slurm":
        s = execution.slurm
        lines.append(
            f"one Slurm job '{evaluate.JOB_NAME}': partition {s.partition or '(default)'}, gpus_per_node"
            f" {s.gpus_per_node}, cpus_per_task {s.cpus_per_task or '(default)'}, mem {s.mem_gb or '(default)'} GB,"
            f" time {s.time_min} min, logs in {evaluate.job_log_dir(out)}"
        )
        lines += [f"  setup: {line}" for line in s.setup]
    return lines
