"""``doctor``: check this machine (and measure it) before a large submission."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import render
from .common import subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "doctor",
        run,
        help="check this machine (and measure it) before a large submission: CPU parts, or --gpu",
        description="Run synthesis, Megatron-Core training, a Hugging Face training baseline, a resume and an"
        " export through the real code paths on this machine and write one JSON report (docs/doctor.md)."
        " Without --gpu: the CPU parts (a tiny model, one CPU rank). With --gpu: CUDA, NCCL and bf16 checks and"
        " a ~350M Llama-style model in bf16 on every visible GPU, tokens/s and MFU beside transformers'.",
        epilog="examples:\n  python -m ipt_hpc.launch doctor\n  python -m ipt_hpc.launch doctor --gpu --dry-run\n"
        "  srun --gpus=1 python -m ipt_hpc.launch doctor --gpu --out doctor-gpu.json",
    )
    p.add_argument("--gpu", action="store_true", help="the GPU checks and the GPU-sized model")
    p.add_argument("--out", default="doctor.json", metavar="FILE", help="the JSON report (default: doctor.json)")
    p.add_argument("--work", metavar="DIR", help="scratch folder (default: a new temporary folder, removed)")
    p.add_argument("--dry-run", action="store_true", help="print the checks and the model, run nothing")


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from .. import doctor

    if args.dry_run:
        return render.dry_run(None, doctor.plan(args.gpu))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ipt-doctor-"))
    try:
        report = doctor.run(args.gpu, Path(args.out), work, log=render.stderr_log)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, r in report["checks"].items() if not r.get("ok")]
    print(f"doctor: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; report: {args.out}")
    return 0 if not failed else 1
