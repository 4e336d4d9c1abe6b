"""``export``: a Megatron-Core checkpoint (any TP/PP) -> a Hugging Face Llama/Mistral folder, logits checked."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import render
from .common import subcommand


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "export",
        run,
        help="Megatron-Core checkpoint (any TP/PP) -> Hugging Face Llama/Mistral folder, logits checked",
        description="Load a train-stage checkpoint at TP=1 PP=1 on the CPU (dist_checkpointing reshards), rename"
        " and split its tensors into a Hugging Face Llama or Mistral model (config.json, safetensors,"
        " generation_config.json, tokenizer), check that the HF model's logits equal Megatron's on probe tokens,"
        " then publish OUT atomically (written as OUT.partial, renamed at the end). See docs/export.md.",
        epilog="examples:\n"
        "  python -m ipt_hpc.launch export --checkpoint runs/demo/train/checkpoints --out runs/demo/hf\n"
        "  python -m ipt_hpc.launch export --checkpoint runs/demo/train/checkpoints/iter_0000040 --out runs/demo/hf40"
        " --dtype bfloat16 --arch mistral\n"
        "  python -m ipt_hpc.launch export --checkpoint /scratch/rw/train/checkpoints --out /scratch/rw/hf"
        " --tokenizer /scratch/rw/tokens/augmented/tokenizer --vocab tokenizer",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="RUN, RUN/train/checkpoints (its latest) or .../iter_N"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="model folder to write (e.g. RUN/hf)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: RUN/tokens/<group>/tokenizer)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype (float32)")
    p.add_argument("--arch", choices=["llama", "mistral"], default="llama", help="HF architecture (llama)")
    p.add_argument("--config", metavar="FILE", help="the run's train config (default: RUN/train/config.yaml)")
    p.add_argument(
        "--vocab",
        choices=["padded", "tokenizer"],
        default="padded",
        help="padded: keep every embedding row (vocab_size = train.model.vocab_size); tokenizer: slice to its size",
    )
    p.add_argument("--no-check", action="store_true", help="skip the HF-vs-Megatron logit check (saves memory)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the checkpoint, config and tokenizer it would use")


def run(args: argparse.Namespace) -> int:
    if "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # export runs on the CPU, even on a GPU node
    from ..model.export import export, find_checkpoint, find_tokenizer, train_config

    if args.dry_run:
        ckpt = find_checkpoint(args.checkpoint)
        cfg = train_config(ckpt, args.config)
        m = cfg.model
        return render.dry_run(
            None,
            [
                f"export {ckpt} -> {args.out} ({args.arch}, {args.dtype}, vocab {args.vocab})",
                f"  {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads /"
                f" {m.num_query_groups or m.num_attention_heads} key-value heads, {m.vocab_size} embedding rows",
                f"  tokenizer: {find_tokenizer(ckpt, cfg, args.tokenizer) or 'none found'}",
            ],
        )
    options = {name: getattr(args, name) for name in ("tokenizer", "dtype", "arch", "config", "vocab", "force")}
    result = export(args.checkpoint, args.out, check=not args.no_check, log=render.stderr_log, **options)
    diff = "not checked" if result.max_abs_logit_diff is None else f"max |logit diff| {result.max_abs_logit_diff:.3g}"
    print(
        f"{result.out}: {result.arch} {result.dtype}, vocab {result.vocab_size}, iteration {result.iteration}"
        f" (saved at TP {result.saved_layout.get('tp')} PP {result.saved_layout.get('pp')}), {diff},"
        f" {result.seconds:.1f} s"
    )
    return 0
