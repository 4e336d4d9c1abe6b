"""``publish``: a run's shards -> a Hugging Face dataset folder (Parquet per shard + card), optionally pushed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import render
from .common import common, flag, load, run_stage_command, shard_options, subcommand


def _parts(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "publish",
        run,
        help="a run's shards -> a Hugging Face dataset folder (Parquet + dataset card), optionally pushed",
        description="Write each part of a run (augmented: templify's texts; synth: the synthesizer's pairs per"
        " context; raw: the sharded corpus) as one config of a dataset folder that datasets.load_dataset(OUT)"
        " reads: OUT/<part>/shard-NNNNN.parquet, one per run shard, through the execution layer (resumable,"
        " byte-identical on rerun), then OUT/README.md, the dataset card with the hub's metadata and the run's"
        " provenance. --push uploads OUT to the hub (resumable); offline it stops before any transfer.",
        epilog="examples:\n  python -m ipt_hpc.launch publish --run runs/demo --out runs/demo-dataset\n"
        "  python -m ipt_hpc.launch publish --run /scratch/rw --out /scratch/rw-hf --what augmented,synth,raw"
        " --executor slurm --shards-per-task 64 --wait\n"
        "  python -m ipt_hpc.launch publish --run runs/demo --out runs/demo-dataset --repo-id ORG/NAME --push"
        " --dry-run   # files and sizes the upload would send\n"
        "  python -m ipt_hpc.launch shard --input runs/demo-dataset --out RUN2/raw   # the reverse path",
    )
    p.add_argument("--run", metavar="RUN", required=True)
    flag(p, "--out", key="publish.out", metavar="DIR")
    flag(p, "--what", key="publish.what", convert=_parts, metavar="PARTS",
         help="parts to publish, comma-separated: augmented,synth,raw (default: augmented,synth)")  # fmt: skip
    flag(p, "--repo-id", key="publish.repo_id", metavar="ORG/NAME")
    flag(p, "--license", key="publish.license", metavar="ID")
    p.add_argument("--push", action="store_true", help="upload OUT to the hub dataset --repo-id once it is complete")
    shard_options(p, wait_help="with --executor slurm: wait for the arrays, then write the card (and push)")
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..errors import IptError
    from ..stages import publish_hub
    from ..stages.publish import STAGE

    cfg = load(args)
    if args.push and not cfg.publish.repo_id:
        raise IptError("publish --push: say where to: --repo-id ORG/NAME (publish.repo_id)")
    if args.push and not args.dry_run:
        publish_hub.check_online()  # offline: one line, before anything is written or sent
    console = render.console()
    complete = True
    for part in cfg.publish.what:  # one stage run per part, as tokenize has one per group
        part_args = argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, f"publish.part={part}"]})
        _, result, out = run_stage_command(part_args, STAGE, _describe, prepare_dry_run=False, follow=False)
        m = result and result["manifest"]
        if m:
            t = m["totals"]
            console.print(f"{part}: {t['records']:,} rows, {t['bytes'] / 1e6:.2f} MB of Parquet in {out}")
        complete = complete and bool(m)
    folder = Path(cfg.publish.out or "")
    if args.dry_run:
        if args.push:
            _show_upload(console, folder, cfg.publish.repo_id)
        return 0
    if not complete:
        console.print("the card is written once every part is complete: rerun this command when the arrays end")
        return 0
    console.print(f"dataset card: {publish_hub.write_card(cfg, args.run, folder)}")
    if args.push:
        publish_hub.push(folder, cfg.publish.repo_id)
        console.print(f"uploaded {folder} to https://huggingface.co/datasets/{cfg.publish.repo_id}")
    return 0


def _show_upload(console: Any, folder: Path, repo_id: str) -> None:
    from ..stages.publish_hub import upload_plan

    files = upload_plan(folder) if folder.is_dir() else []
    for name, size in files:
        console.print(f"  {size:>14,}  {name}")
    total = sum(size for _, size in files)
    console.print(f"would upload {len(files)} files, {total / 1e6:.2f} MB, to datasets/{repo_id} (nothing sent)")
    if not files:
        console.print(f"{folder} holds nothing to upload yet: publish without --dry-run first")


def _describe(stage: Any, cfg: Any) -> list[str]:
    job = stage.stage_config
    return [
        f"publish {job.part}: {stage.num_shards} shards of {stage.in_dir} -> {stage.out_dir}/shard-*.parquet"
        f" (row groups of {job.row_group_rows} rows, {job.compression}) on {cfg.execution.backend}"
    ]
