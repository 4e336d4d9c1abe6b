"""Command line: ``python -m ipt_hpc.launch <stage> ...``.

Errors a user can act on are printed as one message, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .errors import IptError
from .layout import RunLayout, state_dir

EPILOG_SHARD = """\
examples:
  # 64 shards of a local JSON Lines corpus whose text field is 'content' (RefinedWeb)
  python -m ipt_hpc.launch shard --input data/refinedweb/ --num-shards 64 \\
      --set shard.text_field=content --out runs/rw/raw

  # the bundled demo corpus, bad records set aside instead of stopping the run
  python -m ipt_hpc.launch shard --config configs/demo.yaml --out runs/demo/raw \\
      --on-bad-record quarantine

  # print what would run, without reading the corpus
  python -m ipt_hpc.launch shard --config configs/demo.yaml --out runs/demo/raw --dry-run
"""


EPILOG_EVAL = """\
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


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", help="YAML config (see configs/); validated on load")
    g.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any config field, e.g. --set records.level=6 (repeatable)",
    )
    e = p.add_argument_group("execution")
    e.add_argument("--executor", choices=["local", "slurm", "debug"], help="where tasks run (default: local)")
    e.add_argument("--workers", type=int, metavar="N", help="local worker processes (default: CPU count)")
    e.add_argument("--partition", help="Slurm partition (execution.slurm.partition)")
    e.add_argument("--shards-per-task", type=int, metavar="K", help="shards packed into one Slurm array task")
    e.add_argument("--parallelism", type=int, metavar="P", help="at most P array tasks at once (%%P throttle)")
    e.add_argument("--force", action="store_true", help="redo the stage even if its output is complete")
    e.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    e.add_argument(
        "--skip-preflight",
        action="store_true",
        help="submit without checking models, inputs, disk room and the Slurm request first",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ipt_hpc.launch",
        description="Instruction Pre-Training at HPC scale: run one pipeline stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ipt_hpc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    sub.required = True

    p = sub.add_parser(
        "shard",
        help="raw corpus -> N zstd JSONL shards with stable ids and a manifest",
        description="Split a raw corpus (JSON Lines, optionally .gz/.zst; parquet; arrow; a hub dataset name)"
        " into N zstd JSON Lines shards balanced by text bytes, with stable ids and manifest.json.",
        epilog=EPILOG_SHARD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", dest="inputs", metavar="PATH", nargs="+", action="extend", help="files, folders or globs")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--out", metavar="DIR", help="output folder (e.g. RUN/raw)")
    dest.add_argument("--run", metavar="RUN", help="run folder; output goes to RUN/raw")
    p.add_argument("--num-shards", type=int, metavar="N")
    p.add_argument("--text-field", metavar="NAME", help="field holding the document text (default: text)")
    p.add_argument("--id-field", metavar="NAME", help="use the source's own id field")
    p.add_argument("--format", choices=["auto", "jsonl", "parquet", "arrow", "hub"])
    p.add_argument("--on-bad-record", choices=["error", "quarantine"])
    _common(p)
    p.set_defaults(handler=cmd_shard)

    p = sub.add_parser(
        "synthesize",
        help="raw shards -> instruction-response pairs per document (the paper's multi-round synthesis)",
        description="Run the instruction synthesizer over RUN/raw with the paper's M-round few-shot procedure;"
        " writes RUN/synth/shard-NNNNN.jsonl.zst, resumable at record granularity.",
        epilog="examples:\n  python -m ipt_hpc.launch synthesize --run runs/demo --model models/tiny-synthesizer\n"
        "  python -m ipt_hpc.launch synthesize --run /scratch/rw --model instruction-pretrain/instruction-synthesizer"
        " --backend vllm --executor slurm --shards-per-task 16 --parallelism 64 --set execution.slurm.gpus_per_node=1\n"
        "  python -m ipt_hpc.launch synthesize --run /scratch/rw --shards failed --executor slurm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True)
    p.add_argument("--model", metavar="PATH_OR_NAME", help="synth.model")
    p.add_argument("--backend", choices=["transformers", "vllm"], help="synth.backend")
    p.add_argument("--shards", default="all", metavar="SPEC", help="0-99, 3,17, all, missing, failed")
    p.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the arrays")
    _common(p)
    p.set_defaults(handler=cmd_synthesize)

    p = sub.add_parser(
        "finetune-synthesizer",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", metavar="FILE.jsonl", help='examples {"id", "context", "pairs": [{"Q", "A"}]}')
    p.add_argument("--heldout", metavar="FILE.jsonl", help="held-out examples whose contexts measure the parse rate")
    p.add_argument("--out", metavar="DIR", help="model folder to write (DIR.partial until complete)")
    p.add_argument("--base", metavar="MODEL_DIR", help="model to fine-tune (default: a small Llama from scratch)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (deterministic for a seed)")
    p.add_argument("--max-minutes", type=float, metavar="M", help="stop cleanly after M minutes")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: all cores)")
    p.add_argument("--config", metavar="FILE", help="YAML config (finetune_synth and synth sections)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[])
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="print what would be trained and exit")
    p.set_defaults(handler=cmd_finetune_synthesizer)

    p = sub.add_parser(
        "templify",
        help="synthesized records -> instruction-augmented pre-training texts (+ unconverted raw texts)",
        description="Rebuild each shard's few-shot chains and render them as pre-training texts in formats drawn"
        " per record (deterministic by id and seed); writes RUN/augmented/shard-NNNNN.jsonl.zst with a 'group'"
        " field per record (augmented or raw), a manifest with format stats and two PNG charts.",
        epilog="examples:\n  python -m ipt_hpc.launch templify --run runs/demo\n"
        "  python -m ipt_hpc.launch templify --run /scratch/rw --executor slurm --shards-per-task 64\n"
        "  python -m ipt_hpc.launch tokenize --run runs/demo --input-stage augmented --record-group raw"
        " --tokenizer tok/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True)
    p.add_argument("--input-stage", metavar="FOLDER", help="synthesize output folder (templify.input_stage)")
    p.add_argument("--seed", type=int, help="global seed of the format draw (templify.seed)")
    p.add_argument("--shards", default="all", metavar="SPEC", help="0-99, 3,17, all, missing, failed")
    p.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the arrays")
    _common(p)
    p.set_defaults(handler=cmd_templify)

    p = sub.add_parser(
        "mixture",
        help="Megatron blend weights and token shares of a run's tokenized groups",
        description="Read RUN/tokens/*/manifest.json, apply mixture.groups (repeat or share per group) and write"
        " RUN/mixture.json with the weights for megatron-core's BlendedMegatronDatasetBuilder.",
        epilog="example:\n  python -m ipt_hpc.launch mixture --run runs/demo --config configs/refinedweb.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True)
    p.add_argument("--config", metavar="FILE", help="YAML config with a mixture section")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[])
    p.set_defaults(handler=cmd_mixture)

    p = sub.add_parser(
        "report",
        help="one markdown + HTML page per run: stages, synthesis stats, mixture, loss curve, eval, PNG charts",
        description="Write RUN/report/report.md and report.html (with PNG charts beside them) from the run's"
        " manifests, training log and evaluation results; sections appear for the stages the run holds.",
        epilog="example:\n  python -m ipt_hpc.launch report --run runs/demo && chromium runs/demo/report/report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True)
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser(
        "tokenize",
        help="zstd JSONL shards -> Megatron indexed datasets (.bin/.idx), merged per group",
        description="Tokenize a stage's shards with a Hugging Face fast tokenizer into Megatron indexed datasets"
        " (RUN/tokens/GROUP/shard-NNNNN.{bin,idx}), then merge them into RUN/tokens/GROUP.{bin,idx}.",
        epilog="examples:\n  python -m ipt_hpc.launch tokenize --run runs/demo --input-stage raw --tokenizer tok/\n"
        "  python -m ipt_hpc.launch tokenize --run /scratch/rw --input-stage augmented --tokenizer"
        " meta-llama/Llama-2-7b-hf --executor slurm --shards-per-task 8\n"
        "  python -m ipt_hpc.launch merge --run /scratch/rw --group augmented   # after the Slurm arrays",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True)
    p.add_argument("--input-stage", metavar="FOLDER", help="raw, synth, augmented, ... (tokenize.input_stage)")
    p.add_argument("--tokenizer", metavar="PATH_OR_NAME", help="tokenize.tokenizer")
    p.add_argument("--group", metavar="NAME", help="output group (default: --record-group, else the input stage)")
    p.add_argument("--record-group", metavar="NAME", help="only records whose 'group' field is NAME")
    p.add_argument("--shards", default="all", metavar="SPEC", help="0-99, 3,17, all, missing, failed")
    p.add_argument("--wait", action="store_true", help="with --executor slurm: wait, then merge")
    _common(p)
    p.set_defaults(handler=cmd_tokenize)

    p = sub.add_parser(
        "eval",
        help="lm-evaluation-harness on a Hugging Face model, as the InstructLM model card runs it",
        description="Run lm-eval (add_bos_token=True, greedy, batch size auto) on the model card's task groups:"
        " zero_shot (piqa, hellaswag, winogrande; 0-shot) and five_shot (social_iqa, ai2_arc, openbookqa, boolq,"
        " mmlu; 5-shot). Writes RUN/eval/<group>.json (lm-eval's JSON), manifest.json and results.md (our scores"
        " next to the paper's). Every dataset is loaded before the model: an uncached dataset on an offline node"
        " stops the run with the dataset's name and the command that downloads it.",
        epilog=EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PATH_OR_NAME", help="Hugging Face model folder, e.g. RUN/hf (eval.model)")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--run", metavar="RUN", help="run folder; output goes to RUN/eval (default: the model's parent)")
    dest.add_argument("--out", metavar="DIR", help="output folder (eval.out)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--groups", metavar="A,B", help="configured groups to run (default: all: zero_shot,five_shot)")
    what.add_argument("--tasks", metavar="T1,T2", help="run these lm-eval tasks as one group 'tasks' instead")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="with --tasks: few-shot examples (default: task's)")
    p.add_argument("--include-path", metavar="DIR", action="append", help="folder of custom task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, metavar="N", help="documents per task (a fraction if < 1); smoke tests only")
    p.add_argument("--batch-size", metavar="B", help="int, auto or auto:N (eval.batch_size; default auto)")
    p.add_argument("--dtype", help="model dtype (eval.dtype; model card: float16; float32 on CPU)")
    p.add_argument("--device", help="cuda, cuda:0, cpu (eval.device; default: cuda when available)")
    p.add_argument("--prefetch", action="store_true", help="only download the tasks' datasets into the HF cache")
    g = p.add_argument_group("configuration and execution")
    g.add_argument("--config", metavar="FILE", help="YAML config (see configs/); validated on load")
    g.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="e.g. --set eval.seed=[1,2,3,4]",
    )
    g.add_argument("--executor", choices=["local", "slurm", "debug"], help="local: here; slurm: one GPU job")
    g.add_argument("--partition", help="Slurm partition (execution.slurm.partition)")
    g.add_argument("--force", action="store_true", help="re-evaluate groups that are done")
    g.add_argument("--dry-run", action="store_true", help="print the lm-eval calls (and the Slurm job) and exit")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("merge", help="merge a tokenized group's shards into RUN/tokens/GROUP.{bin,idx}")
    p.add_argument("--run", metavar="RUN", required=True)
    p.add_argument("--group", metavar="NAME", required=True)
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser(
        "train",
        help="pre-train with Megatron-Core (TP/PP/DP) on the run's tokenized groups; resumes from checkpoints",
        description="Train a Llama-style GPTModel with Megatron-Core on RUN/tokens/<group> blends (train.data.groups)."
        " Writes RUN/train/: config.yaml, log.jsonl, loss.png, checkpoints/. Rerunning resumes from the latest"
        " complete checkpoint. local: torchrun with train.ranks_per_node ranks here; slurm: one job of train.nodes"
        " nodes (slurm/train.sbatch), requeued after the warning signal; debug: one rank in this process.",
        epilog="examples:\n  python -m ipt_hpc.launch train --config configs/train/tiny.yaml --run runs/demo\n"
        "  python -m ipt_hpc.launch train --config configs/train/tiny.yaml --run runs/demo"
        " --set train.tensor_parallel=2 --set train.ranks_per_node=2\n"
        "  python -m ipt_hpc.launch train --config configs/train/instructlm-500m.yaml --run /scratch/rw"
        " --executor slurm --nodes 4 --ranks-per-node 8 --set execution.slurm.gpus_per_node=8 --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder (reads RUN/tokens, writes RUN/train)")
    p.add_argument("--nodes", type=int, metavar="N", help="train.nodes (Slurm)")
    p.add_argument("--ranks-per-node", type=int, metavar="G", help="train.ranks_per_node (one per GPU)")
    p.add_argument("--iters", type=int, metavar="N", help="train.train_iters")
    p.add_argument("--signal", metavar="NAME", help="train.exit_signal: Slurm's warning signal (default USR1)")
    p.add_argument("--exit-duration", type=float, metavar="MIN", help="train.exit_duration_min: save and exit after")
    _common(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "export",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "pipeline",
        help="submit every available stage at once, chained with Slurm afterok dependencies",
        description="Submit (Slurm) or run (local) every stage the config asks for, in order: shard; synthesize and"
        " templify (synth.model set); tokenize per record group and the mixture (tokenize.tokenizer set); train,"
        " export and eval (the config has a train section); the report. On Slurm each stage waits for the"
        " previous one (afterok); a failed stage cancels the rest.",
        epilog="examples:\n  python -m ipt_hpc.launch pipeline --config configs/demo.yaml --run runs/demo\n"
        "  python -m ipt_hpc.launch pipeline --config configs/refinedweb.yaml --run /scratch/rw"
        " --executor slurm --partition cpu\n  python -m ipt_hpc.launch status --run /scratch/rw",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder")
    p.add_argument(
        "--wait", action="store_true", help="with --executor slurm: wait for the chain, then say how it ended"
    )
    _common(p)
    p.set_defaults(handler=cmd_pipeline)

    p = sub.add_parser(
        "status",
        help="shards done / running / pending / failed per stage, with throughput and ETA",
        description="Report every stage of a run from its completion markers and the Slurm queue.",
        epilog="examples:\n  python -m ipt_hpc.launch status --run runs/demo\n"
        "  python -m ipt_hpc.launch status --run runs/demo --json | jq '.stages[].counts'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="RUN", required=True, help="run folder (or one stage folder)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-queue", action="store_true", help="do not ask Slurm (markers only)")
    p.add_argument("--shards", action="store_true", help="list every shard's state (with --json)")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "run-shard",
        help="run shards of a prepared per-shard stage here (the entry point of hand-written sbatch arrays)",
        description="Run shard OFFSET + TASK_INDEX*K + j (j < K) of a prepared stage folder; done shards are"
        " skipped, partial ones resume. USR2 makes progress durable and requeues the Slurm job.",
        epilog="examples:\n  sbatch --array=0-999%64 slurm/stage-array.sbatch RUN/synth\n"
        "  python -m ipt_hpc.launch run-shard --stage-dir RUN/synth --task-index 17",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage-dir", required=True, metavar="DIR")
    p.add_argument("--task-index", type=int, default=0, metavar="I", help="usually $SLURM_ARRAY_TASK_ID")
    p.add_argument("--shards-per-task", type=int, default=1, metavar="K")
    p.add_argument("--offset", type=int, default=0, metavar="O", help="first shard of task 0")
    p.set_defaults(handler=cmd_run_shard)

    p = sub.add_parser(
        "sbatch",
        help="print an sbatch script for a prepared per-shard stage, with the run's Slurm settings",
        description="Print a job-array script that runs `run-shard` with this config's Slurm settings"
        " (partition, time, GPUs, setup lines); every substituted value is shell-quoted.",
        epilog="example:\n  python -m ipt_hpc.launch sbatch --stage-dir RUN/synth --config configs/x.yaml"
        " --parallelism 64 > synth.sbatch && sbatch synth.sbatch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage-dir", required=True, metavar="DIR")
    p.add_argument("--python", help="interpreter on the compute nodes (default: this one)")
    _common(p)
    p.set_defaults(handler=cmd_sbatch)

    p = sub.add_parser(
        "doctor",
        help="check this machine (and measure it) before a large submission: CPU parts, or --gpu",
        description="Run synthesis, Megatron-Core training, a Hugging Face training baseline, a resume and an"
        " export through the real code paths on this machine and write one JSON report (docs/doctor.md)."
        " Without --gpu: the CPU parts (a tiny model, one CPU rank). With --gpu: CUDA, NCCL and bf16 checks and"
        " a ~350M Llama-style model in bf16 on every visible GPU, tokens/s and MFU beside transformers'.",
        epilog="examples:\n  python -m ipt_hpc.launch doctor\n  python -m ipt_hpc.launch doctor --gpu --dry-run\n"
        "  srun --gpus=1 python -m ipt_hpc.launch doctor --gpu --out doctor-gpu.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpu", action="store_true", help="the GPU checks and the GPU-sized model")
    p.add_argument("--out", default="doctor.json", metavar="FILE", help="the JSON report (default: doctor.json)")
    p.add_argument("--work", metavar="DIR", help="scratch folder (default: a new temporary folder, removed)")
    p.add_argument("--dry-run", action="store_true", help="print the checks and the model, run nothing")
    p.set_defaults(handler=cmd_doctor)
    return parser


EXECUTION_FLAGS = {
    "executor": "execution.backend",
    "workers": "execution.workers",
    "partition": "execution.slurm.partition",
    "shards_per_task": "execution.shards_per_task",
    "parallelism": "execution.parallelism",
}


def _flag_values(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) is not None}


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _progress_reporter(console: Any) -> tuple[Any, Callable[[str, int, int], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = prog.add_task(phase, total=total)
        prog.update(tasks[phase], completed=done, total=total)

    return prog, update


def cmd_shard(args: argparse.Namespace) -> int:
    from .config import load_config
    from .stages import shard
    from .stages.sources import discover_inputs

    flags = _flag_values(
        args,
        {
            "inputs": "shard.inputs",
            "num_shards": "shard.num_shards",
            "text_field": "shard.text_field",
            "id_field": "shard.id_field",
            "format": "shard.format",
            "on_bad_record": "records.on_bad_record",
            **EXECUTION_FLAGS,
        },
    )
    cfg = load_config(args.config, args.overrides, flags)
    if not (args.out or args.run):
        raise IptError("shard: say where to write: --out DIR or --run RUN")
    out = Path(args.out) if args.out else RunLayout.of(args.run).raw
    console = _console()
    if args.dry_run:
        inputs = discover_inputs(cfg.shard.inputs, cfg.shard.format)
        total = sum(i.size for i in inputs)
        console.print(
            f"shard: {len(inputs)} input(s), {total / 1e6:.1f} MB on disk -> {cfg.shard.num_shards} shards in {out}"
        )
        for inp in inputs[:20]:
            console.print(
                f"  {inp.name}  ({inp.format}{'+' + inp.compression if inp.compression else ''}, {inp.size} bytes)"
            )
        if len(inputs) > 20:
            console.print(f"  ... and {len(inputs) - 20} more")
        console.print(f"executor: {cfg.execution.backend}, workers: {cfg.execution.workers or 'CPU count'}")
        console.print(f"config hash: {shard.fingerprint(cfg, inputs)}")
        return 0
    if not args.skip_preflight:
        from . import preflight

        preflight.shard(cfg, out)
    prog, update = _progress_reporter(console)
    started = time.time()
    with prog:
        manifest = shard.run(cfg, out, force=args.force, progress=update, log=lambda m: prog.console.print(m))
    _print_shard_summary(console, manifest, out, time.time() - started)
    return 0


def _print_shard_summary(console: Any, manifest: dict[str, Any], out: Path, seconds: float) -> None:
    from rich.table import Table

    from .stages.shard import imbalance

    t = manifest["totals"]
    table = Table(title=f"shard -> {out}", show_header=True)
    for col in ("shards", "docs", "text MB", "zstd MB", "bad", "blank", "max/mean", "docs/s"):
        table.add_column(col, justify="right")
    rate = t["docs"] / t["seconds"] if t["seconds"] else float("nan")
    table.add_row(
        str(t["shards"]),
        str(t["docs"]),
        f"{t['text_bytes'] / 1e6:.2f}",
        f"{t['bytes'] / 1e6:.2f}",
        str(t["bad"]),
        str(t["blank_lines"]),
        f"{imbalance(manifest):.3f}",
        f"{rate:,.0f}",
    )
    console.print(table)
    if t["bad"]:
        console.print(f"bad records by reason: {t['bad_by_reason']}; set aside in {out / 'quarantine'}")
    console.print(f"manifest: {out / 'manifest.json'}")


def _preflight(args: argparse.Namespace, cfg: Any) -> Any:
    """The preflight check a stage's launch runs on its selected shards (None with --skip-preflight)."""
    from . import preflight

    return None if getattr(args, "skip_preflight", False) else preflight.stage_checker(cfg)


def _preflight_early(args: argparse.Namespace, cfg: Any, stage: str) -> None:
    """The model/tokenizer and Slurm checks, before the stage loads anything (not with --skip-preflight)."""
    from . import preflight

    if not args.skip_preflight:
        preflight.early(cfg, stage)


def _launch_stage(args: argparse.Namespace, stage: Any, cfg: Any, label: str) -> int:
    """Submit a record stage's selected shards with a progress bar (shared by synthesize and templify)."""
    from .execution import StageState, launch

    console = _console()
    prog, update = _progress_reporter(console)
    state = StageState(stage.out_dir)
    with prog:
        result = launch(
            stage,
            args.shards,
            cfg.execution,
            force=args.force,
            wait=args.wait,
            on_progress=lambda: update(label, len(state.names("done")), stage.num_shards),
            check=_preflight(args, cfg),
        )
    console.print(result)
    console.print(f"follow with: python -m ipt_hpc.launch status --run {args.run}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from .config import load_config
    from .execution import build
    from .execution.submit import prepare
    from .stages import synthesize

    flags = _flag_values(args, {"model": "synth.model", "backend": "synth.backend"})
    cfg = load_config(args.config, args.overrides, {**flags, **_flag_values(args, EXECUTION_FLAGS)})
    _preflight_early(args, cfg, "synthesize")
    stage = build(synthesize.STAGE, cfg, args.run)
    if args.dry_run:  # prepares the stage folder (for hand-written sbatch arrays) and submits nothing
        prepare(stage)
        job = stage.stage_config
        _console().print(
            f"synthesize {stage.num_shards} shards of {stage.in_dir} with {job.model} ({job.backend}),"
            f" {job.rounds} rounds, max_new_tokens {job.max_new_tokens}, max_model_len {job.max_model_len},"
            f" converting {job.convert_share:.0%} of documents, on {cfg.execution.backend}"
        )
        return 0
    return _launch_stage(args, stage, cfg, "synth")


def cmd_templify(args: argparse.Namespace) -> int:
    from .config import load_config
    from .execution import build
    from .execution.submit import prepare
    from .stages import templify

    flags = _flag_values(args, {"seed": "templify.seed", "input_stage": "templify.input_stage"})
    cfg = load_config(args.config, args.overrides, {**flags, **_flag_values(args, EXECUTION_FLAGS)})
    _preflight_early(args, cfg, "templify")
    stage = build(templify.STAGE, cfg, args.run)
    if args.dry_run:
        prepare(stage)
        job = stage.stage_config
        _console().print(
            f"templify {stage.num_shards} shards of {stage.in_dir} -> {stage.out_dir} (seed {job.seed},"
            f" unconverted documents from {job.raw_stage or 'nowhere'}) on {cfg.execution.backend}"
        )
        return 0
    rc = _launch_stage(args, stage, cfg, "templify")
    manifest = stage.out_dir / "manifest.json"
    if manifest.exists():
        from .atomic import read_json

        m = read_json(manifest)
        t, charts = m["totals"], ", ".join(str(stage.out_dir / c) for c in m["charts"])
        _console().print(
            f"{t['augmented_texts']:,} augmented texts ({t['pairs']:,} pairs; {t['pairs_dropped']:,} malformed dropped)"
            f", {t['texts_without_pairs']:,} plain, {t['raw_texts']:,} raw; layouts: "
            + ", ".join(f"{k} {v:.1%}" for k, v in t["layouts"].items())
            + f"; charts: {charts or 'none (matplotlib missing)'}"
        )
    return rc


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build

    out = build(args.run)
    _console().print(f"report ({', '.join(out['sections'])}):\n  {out['markdown']}\n  {out['html']}")
    return 0


def cmd_finetune_synthesizer(args: argparse.Namespace) -> int:
    import shlex

    from .config import load_config
    from .model import finetune_synthesizer

    flags = _flag_values(
        args,
        {
            "data": "finetune_synth.data",
            "heldout": "finetune_synth.heldout",
            "out": "finetune_synth.out",
            "base": "finetune_synth.base",
            "steps": "finetune_synth.steps",
            "max_minutes": "finetune_synth.max_minutes",
            "seed": "finetune_synth.seed",
            "threads": "finetune_synth.threads",
        },
    )
    cfg = load_config(args.config, args.overrides, flags)
    fc, console = cfg.finetune_synth, _console()
    if args.dry_run:
        model = (
            f"fine-tune {fc.base}"
            if fc.base
            else f"a {fc.num_layers}-layer Llama (hidden {fc.hidden_size}) from scratch"
        )
        stop = " and ".join(
            s for s in (fc.steps and f"{fc.steps} steps", fc.max_minutes and f"{fc.max_minutes} min") if s
        )
        console.print(f"finetune-synthesizer: {model} on {fc.data} for {stop or '?'}, seed {fc.seed} -> {fc.out}")
        return 0
    command = shlex.join(["python", "-m", "ipt_hpc.launch", *sys.argv[1:]])
    summary = finetune_synthesizer.run(cfg, command, force=args.force, log=console.print)
    ev = summary["eval"]
    rate = f", parse rate {ev['parse_rate']:.0%} of {ev['contexts']} held-out contexts" if ev else ""
    console.print(
        f"{fc.out}: {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['stopped_by']}), loss"
        f" {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{rate}; details in {fc.out}/finetune.json"
    )
    return 0


def cmd_mixture(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .config import load_config
    from .stages.mixture import write_report

    cfg = load_config(args.config, args.overrides)
    report = write_report(args.run, cfg.mixture.groups, cfg.mixture.train_tokens)
    table = Table(title=f"mixture of {args.run}")
    for col in ("group", "documents", "tokens", "weight (share of training tokens)", "epochs"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for name, row in report["groups"].items():
        epochs = f"{row['epochs']:.2f}" if "epochs" in row else "-"
        table.add_row(name, f"{row['documents']:,}", f"{row['tokens']:,}", f"{row['weight']:.4f}", epochs)
    console = _console()
    console.print(table)
    console.print(f"Megatron blend (data_path): {' '.join(report['data_path'])}")
    console.print(f"written to {RunLayout.of(args.run).mixture}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .config import load_config
    from .execution import build, run_stage
    from .stages import tokenize

    flags = _flag_values(
        args,
        {
            "input_stage": "tokenize.input_stage",
            "tokenizer": "tokenize.tokenizer",
            "group": "tokenize.group",
            "record_group": "tokenize.record_group",
        },
    )
    cfg = load_config(args.config, args.overrides, {**flags, **_flag_values(args, EXECUTION_FLAGS)})
    console = _console()
    _preflight_early(args, cfg, "tokenize")
    if args.dry_run:
        stage = build(tokenize.STAGE, cfg, args.run)
        group, job = stage.out_dir, stage.stage_config
        console.print(f"tokenize {stage.num_shards} shards of {stage.in_dir} -> {group} on {cfg.execution.backend}")
        console.print(f"dtype {job.dtype}, BOS {job.bos_id}, EOD {job.eod_id}, {job.workers} tokenizer processes")
        return 0
    prog, update = _progress_reporter(console)
    with prog:
        result = run_stage(
            tokenize.STAGE,
            cfg,
            args.run,
            args.shards,
            force=args.force,
            wait=args.wait,
            progress=update,
            check=_preflight(args, cfg),
        )
    merged = result.pop("manifest", None)
    console.print(result)
    if merged:
        rate = sum(s.get("tokens_per_s") or 0 for s in merged["shards"]) / max(1, len(merged["shards"]))
        console.print(
            f"{merged['dataset']}.{{bin,idx}}: {merged['documents']:,} documents, {merged['tokens']:,} tokens"
            f" (mean {merged['mean_length']}), {rate:,.0f} tokens/s per shard task"
        )
    elif cfg.execution.backend == "slurm":
        console.print(f"follow with: python -m ipt_hpc.launch status --run {args.run}; then merge")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .execution.submit import load_stage_run
    from .stages.tokenize import merge_group

    manifest = merge_group(load_stage_run(RunLayout.of(args.run).token_group(args.group)))
    print(f"{manifest['dataset']}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .model.train import stage

    flags = _flag_values(
        args,
        {
            "nodes": "train.nodes",
            "ranks_per_node": "train.ranks_per_node",
            "iters": "train.train_iters",
            "signal": "train.exit_signal",
            "exit_duration": "train.exit_duration_min",
            "executor": "execution.backend",
            "partition": "execution.slurm.partition",
        },
    )
    cfg = load_config(args.config, args.overrides, flags)
    run = Path(args.run)
    backend = cfg.execution.backend
    if cfg.train.init_from_hf and stage.needs_import(cfg, run):  # fail here, not in the job, on a misfit
        from .model.train.hf_init import check_hf_config

        check_hf_config(cfg.train, cfg.train.init_from_hf)
    if args.dry_run:
        if backend == "slurm":
            sys.stdout.write(stage.slurm_script(cfg, run))
        else:
            t = cfg.train
            print(f"train on {backend}: {' '.join(stage.torchrun_command(cfg, run))}")
            print(
                f"  {t.model.num_layers} layers x {t.model.hidden_size},"
                f" TP {t.tensor_parallel} PP {t.pipeline_parallel},"
                f" {t.train_iters} iterations of {t.global_batch_size} x {t.seq_length} tokens, groups {t.data.groups}"
            )
        return 0
    if backend == "slurm":
        job = stage.submit_slurm(cfg, run)
        print(f"submitted training job {job}; log: {run / 'train' / 'log.jsonl'}, {run / 'train' / 'logs'}")
        return 0
    rc = stage.run_debug(cfg, run) if backend == "debug" else stage.run_local(cfg, run)
    if rc == 75:
        print("train: stopped early with a complete checkpoint; rerun the same command to resume", file=sys.stderr)
    return rc


def cmd_export(args: argparse.Namespace) -> int:
    import os

    if "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # export runs on the CPU, even on a GPU node
    from .model.export import export, find_checkpoint, find_tokenizer, train_config

    if args.dry_run:
        ckpt = find_checkpoint(args.checkpoint)
        cfg = train_config(ckpt, args.config)
        m = cfg.model
        print(f"export {ckpt} -> {args.out} ({args.arch}, {args.dtype}, vocab {args.vocab})")
        print(
            f"  {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads /"
            f" {m.num_query_groups or m.num_attention_heads} key-value heads, {m.vocab_size} embedding rows"
        )
        print(f"  tokenizer: {find_tokenizer(ckpt, cfg, args.tokenizer) or 'none found'}")
        return 0
    result = export(
        args.checkpoint,
        args.out,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        arch=args.arch,
        config=args.config,
        vocab=args.vocab,
        check=not args.no_check,
        force=args.force,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    diff = "not checked" if result.max_abs_logit_diff is None else f"max |logit diff| {result.max_abs_logit_diff:.3g}"
    print(
        f"{result.out}: {result.arch} {result.dtype}, vocab {result.vocab_size}, iteration {result.iteration}"
        f" (saved at TP {result.saved_layout.get('tp')} PP {result.saved_layout.get('pp')}), {diff},"
        f" {result.seconds:.1f} s"
    )
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import Coordinator, Job, ShardStage, available_steps, submit

    cfg = load_config(args.config, args.overrides, _flag_values(args, EXECUTION_FLAGS))
    steps = available_steps(cfg, args.run)
    console = _console()
    if args.dry_run:
        for i, step in enumerate(steps):
            kind = "one job" if isinstance(step, (Coordinator, Job)) else "job arrays"
            after = f", after step {i}" if i and cfg.execution.backend == "slurm" else ""
            console.print(f"step {i + 1}: {step.name} ({kind} on {cfg.execution.backend}{after})")
        return 0
    if not args.skip_preflight:
        from . import preflight

        preflight.pipeline(cfg, args.run, steps)
    if cfg.execution.backend == "slurm":
        submitted = submit(steps, cfg.execution, args.run)
        for result in submitted:
            console.print(result)
        if not args.wait:
            console.print(f"submitted; follow with: python -m ipt_hpc.launch status --run {args.run}")
            return 0
        return _wait_for_pipeline(console, args.run, [j for r in submitted for j in r.get("job_ids", [])])
    started = time.time()
    for i, step in enumerate(steps):
        console.rule(f"[bold]step {i + 1}/{len(steps)}: {step.name}")
        t = time.time()
        try:
            if isinstance(step, ShardStage):
                prog, update = _progress_reporter(console)
                with prog:
                    submit([step], cfg.execution, args.run, progress=update)
            else:
                submit([step], cfg.execution, args.run)
        except IptError as exc:
            later = ", ".join(s.name for s in steps[i + 1 :]) or "none"
            raise IptError(
                f"pipeline stopped at step {i + 1}/{len(steps)} ({step.name}); later steps did not run ({later})."
                f" Rerunning this pipeline command resumes it (done shards are kept).\n{exc}"
            ) from exc
        console.print(f"{step.name}: done in {time.time() - t:,.1f} s")
    _print_outputs(console, args.run, time.time() - started)
    return 0


def _wait_for_pipeline(console: Any, run: str, job_ids: list[str]) -> int:
    """``pipeline --wait`` on Slurm: wait until every job left the queue, then say how it ended."""
    from .execution.backends import wait_for_jobs
    from .status import run_status

    started = time.time()
    console.print(f"waiting for {len(job_ids)} Slurm jobs (Ctrl-C stops waiting, not the jobs)")
    wait_for_jobs(job_ids, poll_s=5.0)
    report = run_status(run)
    if report["root_cause"]:
        console.print(f"[bold red]pipeline failed[/] after {time.time() - started:,.0f} s; later steps were cancelled")
        print_failures(console, report)
        return 1
    final = RunLayout.of(run).report / "report.md"
    if not final.exists() or final.stat().st_mtime < started:
        console.print(
            f"[bold red]pipeline did not finish[/]: no shard failed, so a job step did (train, export, eval, mixture or"
            f" report); their logs: {Path(run) / '_state' / 'logs' / 'pipeline'}, {Path(run) / 'train' / 'logs'}"
        )
        return 1
    _print_outputs(console, run, time.time() - started)
    return 0


def _print_outputs(console: Any, run: str, seconds: float) -> None:
    from rich.table import Table

    from .pipeline import outputs

    table = Table(title=f"pipeline finished in {seconds / 60:,.1f} min: where everything lies")
    table.add_column("what")
    table.add_column("path")
    for what, path in outputs(run):
        table.add_row(what, str(path))
    console.print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .model import evaluate

    flags = _flag_values(
        args,
        {
            "model": "eval.model",
            "out": "eval.out",
            "limit": "eval.limit",
            "batch_size": "eval.batch_size",
            "dtype": "eval.dtype",
            "device": "eval.device",
            "include_path": "eval.include_path",
            "executor": "execution.backend",
            "partition": "execution.slurm.partition",
        },
    )
    if args.limit is not None and args.limit >= 1:
        flags["eval.limit"] = int(args.limit)
    groups = [g for g in args.groups.split(",") if g] if args.groups else None
    if args.tasks:
        tasks = [t for t in args.tasks.split(",") if t]
        flags["eval.groups"] = {"tasks": {"tasks": tasks, "num_fewshot": args.num_fewshot}}
    elif args.num_fewshot is not None:
        raise IptError("eval: --num-fewshot goes with --tasks (a group's shots are set in eval.groups)")
    cfg = load_config(args.config, args.overrides, flags)
    console = _console()
    if args.prefetch:
        for ds in evaluate.prefetch(cfg.eval, groups):
            console.print(f"cached: {ds.describe()} ({len(ds.tasks)} task(s))")
        import datasets

        console.print(f"datasets cache: {datasets.config.HF_DATASETS_CACHE}")
        return 0
    plans = evaluate.plan(cfg.eval, groups)
    out = Path(cfg.eval.out) if cfg.eval.out else RunLayout.of(args.run).eval if args.run else None
    if out is None:
        if not Path(cfg.eval.model or "").is_dir():
            raise IptError("eval: say where to write: --run RUN (results in RUN/eval) or --out DIR")
        out = RunLayout.of(Path(cfg.eval.model).resolve().parent).eval  # RUN/hf -> RUN/eval
    execution = cfg.execution
    if execution.backend == "slurm" and execution.slurm.gpus_per_node is None:
        execution = execution.model_copy(
            update={"slurm": execution.slurm.model_copy(update={"gpus_per_node": 1})}
        )  # an evaluation wants one GPU unless told otherwise
    if args.dry_run:
        console.print(f"eval {cfg.eval.model} -> {out} on {execution.backend}")
        for p in plans:
            console.print(f"group {p.name}: {', '.join(p.tasks)} (num_fewshot {p.num_fewshot})")
            console.print(f"  {p.lm_eval_command(cfg.eval)}", soft_wrap=True)
        if execution.backend == "slurm":
            s = execution.slurm
            console.print(
                f"one Slurm job 'ipt-eval': partition {s.partition or '(default)'}, gpus_per_node {s.gpus_per_node},"
                f" cpus_per_task {s.cpus_per_task or '(default)'}, mem {s.mem_gb or '(default)'} GB,"
                f" time {s.time_min} min, logs in {out / '_state' / 'logs'}"
            )
            for line in s.setup:
                console.print(f"  setup: {line}")
        return 0
    if execution.backend == "slurm":
        from .execution.backends import submit_job

        job = submit_job(
            evaluate.run,
            cfg.eval,
            str(out),
            groups,
            args.force,
            cfg=execution,
            log_dir=state_dir(out) / "logs",
            job_name="ipt-eval",
        )
        console.print(f"submitted Slurm job {job}; results will be in {out / 'results.md'}")
        return 0
    result = evaluate.run(cfg.eval, out, groups, args.force, log_fn=console.print)
    sys.stdout.write(Path(result["table"]).read_text(encoding="utf-8"))
    return 0


def cmd_run_shard(args: argparse.Namespace) -> int:
    from .execution.sbatch import run_shards

    return run_shards(args.stage_dir, args.task_index, args.shards_per_task, args.offset)


def cmd_sbatch(args: argparse.Namespace) -> int:
    from .config import load_config
    from .execution.sbatch import render
    from .execution.submit import load_stage_run

    cfg = load_config(args.config, args.overrides, _flag_values(args, EXECUTION_FLAGS)).execution
    n = load_stage_run(args.stage_dir).num_shards
    tasks = -(-n // cfg.shards_per_task)
    array = f"0-{tasks - 1}" + (f"%{cfg.parallelism}" if cfg.parallelism else "")
    sys.stdout.write(render(args.stage_dir, cfg, array=array, python=args.python))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import orjson

    from .status import run_status

    report = run_status(args.run, use_queue=not args.no_queue)
    if not report["stages"]:
        raise IptError(f"{args.run}: no stage output found (no */_state/stage.json)")
    if args.json:
        if not args.shards:
            for st in report["stages"]:
                st.pop("shards")
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"status of {args.run}")
    columns = ("stage", "shards", "done", "running", "pending", "failed", "never", "records", "tokens", "rec/s", "ETA")
    for col in columns:
        table.add_column(col, justify="right" if col != "stage" else "left")
    for st in report["stages"]:
        c = st["counts"]
        eta = "-" if st["eta_s"] is None else time.strftime("%H:%M:%S", time.gmtime(st["eta_s"]))
        table.add_row(
            st["name"],
            str(st["num_shards"]),
            f"[green]{c['done']}",
            str(c["running"]),
            str(c["pending"]),
            f"[red]{c['failed']}" if c["failed"] else "0",
            str(c["never_submitted"]),
            f"{st['records']:,}",
            f"{st['tokens']:,}",
            "-" if st["records_per_s"] is None else f"{st['records_per_s']:,.1f}",
            eta,
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    print_failures(console, report)
    return 0


def print_failures(console: Any, report: dict[str, Any]) -> None:
    """The root cause first (stage, shard, reason, traceback, the command that resumes), then the rest."""
    from rich.markup import escape

    from .execution.tasks import failure_line, group_failures

    root = report.get("root_cause")
    if root:
        more = f" (and {root['failed'] - 1} more shard(s) of this stage)" if root["failed"] > 1 else ""
        console.print(
            f"[bold red]first failure: {root['stage']} {root['shard']}{more}[/]: {escape(root['error'])}",
            soft_wrap=True,
        )
        if root["log"]:
            console.print(f"  traceback: {root['log']}", soft_wrap=True)
        console.print(f"  resume: {escape(root['resume'])}", soft_wrap=True)
    for st in report["stages"]:
        rest = [
            (n, e)
            for n, e in st["failures"].items()
            if not (root and (st["name"], n) == (root["stage"], root["shard"]))
        ]
        for labels, error in group_failures(rest)[:5]:
            console.print(f"[red]{st['name']}[/red] {escape(failure_line(labels, error))}", soft_wrap=True)
        if st["queue_error"]:
            console.print(f"[yellow]Slurm queue not readable: {st['queue_error']}")
        if st.get("held_jobs"):
            jobs = ",".join(st["held_jobs"])
            console.print(f"[yellow]{st['name']}: Slurm holds job(s) {jobs}; they will not run until released"
                          f" (scontrol release {jobs})", soft_wrap=True)  # fmt: skip


def cmd_doctor(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from . import doctor

    if args.dry_run:
        print("\n".join(doctor.plan(args.gpu)))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ipt-doctor-"))
    try:
        report = doctor.run(args.gpu, Path(args.out), work, log=lambda msg: print(msg, file=sys.stderr))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, r in report["checks"].items() if not r.get("ok")]
    print(f"doctor: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; report: {args.out}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except IptError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
