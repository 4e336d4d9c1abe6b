"""``finetune-synthesizer``: fine-tune (or train from scratch) a small instruction synthesizer."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from . import render
from .common import config_options, flag, load, subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "finetune-synthesizer",
        run,
        help="fine-tune (or train from scratch) a small instruction synthesizer on context -> pairs examples",
        description="Train a causal LM on examples in the synthesizer format (BOS <CON> context </CON>, then"
        " <QUE> q <ANS> a </END> pairs and EOS; loss on the pairs), save it with its tokenizer and finetune.json"
        " (command, data checksum, seed, losses, parse rate on held-out contexts). From scratch without --base.",
        epilog="examples:\n  # the shipped tiny synthesizer (models/tiny-synthesizer/README.md has the exact command)\n"
        "  python -m ipt_hpc.launch finetune-synthesizer --data data/synth-ft/train.jsonl"
        " --heldout data/synth-ft/heldout.jsonl --out models/tiny-synthesizer --steps 700 --seed 0 --threads 2\n"
        "  # a brief run with a time budget and a smaller model\n"
        "  python -m ipt_hpc.launch finetune-synthesizer --data train.jsonl --out /tmp/synth --max-minutes 2"
        " --set finetune_synth.hidden_size=64\n"
        "  # fine-tune an existing model folder on your domain's examples\n"
        "  python -m ipt_hpc.launch finetune-synthesizer --data mydomain.jsonl --base models/my-lm"
        " --out models/my-synth --steps 2000 --set finetune_synth.lr=1e-4",
    )
    flag(p, "--data", key="finetune_synth.data", metavar="FILE.jsonl")
    flag(p, "--heldout", key="finetune_synth.heldout", metavar="FILE.jsonl")
    flag(p, "--out", key="finetune_synth.out", metavar="DIR", help="model folder to write (DIR.partial until complete)")
    flag(p, "--base", key="finetune_synth.base", metavar="MODEL_DIR")
    flag(p, "--steps", key="finetune_synth.steps", type=int, metavar="N")
    flag(
        p,
        "--max-minutes",
        key="finetune_synth.max_minutes",
        type=float,
        metavar="M",
        help="stop cleanly after M minutes",
    )
    flag(p, "--seed", key="finetune_synth.seed", type=int, metavar="S")
    flag(p, "--threads", key="finetune_synth.threads", type=int, metavar="T")
    config_options(p, "YAML config (finetune_synth and synth sections)", None)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="print what would be trained and exit")


def run(args: argparse.Namespace) -> int:
    from ..model import finetune_synthesizer

    cfg = load(args)
    fc, console = cfg.finetune_synth, render.console()
    if args.dry_run:
        model = (
            f"fine-tune {fc.base}"
            if fc.base
            else f"a {fc.num_layers}-layer Llama (hidden {fc.hidden_size}) from scratch"
        )
        stop = " and ".join(
            s for s in (fc.steps and f"{fc.steps} steps", fc.max_minutes and f"{fc.max_minutes} min") if s
        )
        line = f"finetune-synthesizer: {model} on {fc.data} for {stop or '?'}, seed {fc.seed} -> {fc.out}"
        return render.dry_run(console, [line])
    command = shlex.join(["python", "-m", "ipt_hpc.launch", *sys.argv[1:]])
    summary = finetune_synthesizer.run(cfg, command, force=args.force, log=console.print)
    ev = summary["eval"]
    rate = f", parse rate {ev['parse_rate']:.0%} of {ev['contexts']} held-out contexts" if ev else ""
    console.print(
        f"{fc.out}: {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['stopped_by']}), loss"
        f" {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{rate}; details in {fc.out}/finetune.json"
    )
    return 0
