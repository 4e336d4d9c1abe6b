"""``shard``: a raw corpus -> N zstd JSON Lines shards with stable ids and a manifest."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import IptError
from ..layout import RunLayout
from . import render
from .common import common, flag, load, subcommand

EPILOG = """\
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


def add_parser(sub: Any) -> None:
    p = subcommand(
        sub,
        "shard",
        run,
        help="raw corpus -> N zstd JSONL shards with stable ids and a manifest",
        description="Split a raw corpus (JSON Lines, optionally .gz/.zst; parquet; arrow; a hub dataset name)"
        " into N zstd JSON Lines shards balanced by text bytes, with stable ids and manifest.json.",
        epilog=EPILOG,
    )
    flag(p, "--input", key="shard.inputs", dest="inputs", metavar="PATH", nargs="+", action="extend")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--out", metavar="DIR", help="output folder (e.g. RUN/raw)")
    dest.add_argument("--run", metavar="RUN", help="run folder; output goes to RUN/raw")
    flag(p, "--num-shards", key="shard.num_shards", type=int, metavar="N")
    flag(
        p,
        "--text-field",
        key="shard.text_field",
        metavar="NAME",
        help="field holding the document text (default: text)",
    )
    flag(p, "--id-field", key="shard.id_field", metavar="NAME")
    flag(p, "--format", key="shard.format", choices=["auto", "jsonl", "parquet", "arrow", "hub"])
    flag(p, "--on-bad-record", key="records.on_bad_record", choices=["error", "quarantine"])
    common(p)


def run(args: argparse.Namespace) -> int:
    from ..execution import run_stage
    from ..stages import shard

    if not (args.out or args.run):
        raise IptError("shard: say where to write: --out DIR or --run RUN")
    out = Path(args.out) if args.out else RunLayout.of(args.run).raw
    cfg = load(args, {"shard.output_folder": out.name})  # the stage's folder in the run folder out.parent
    console = render.console()
    if args.dry_run:
        return render.dry_run(console, _plan(cfg, out))
    if not args.skip_preflight:
        from .. import preflight

        preflight.shard(cfg, out)
    prog, update = render.progress_reporter(console)
    started = time.time()
    with prog:
        result = run_stage(shard.STAGE, cfg, out.parent, force=args.force, progress=update)
    if not result["submitted"]:
        console.print(f"{out}: already complete for this config and these inputs (use --force to redo)")
    _print_summary(console, result["manifest"], out, time.time() - started)
    return 0


def _plan(cfg: Any, out: Path) -> list[str]:
    from ..stages.shard import fingerprint
    from ..stages.sources import discover_inputs

    inputs = discover_inputs(cfg.shard.inputs, cfg.shard.format)
    total = sum(i.size for i in inputs)
    lines = [f"shard: {len(inputs)} input(s), {total / 1e6:.1f} MB on disk -> {cfg.shard.num_shards} shards in {out}"]
    for inp in inputs[:20]:
        lines.append(
            f"  {inp.name}  ({inp.format}{'+' + inp.compression if inp.compression else ''}, {inp.size} bytes)"
        )
    if len(inputs) > 20:
        lines.append(f"  ... and {len(inputs) - 20} more")
    lines.append(f"executor: {cfg.execution.backend}, workers: {cfg.execution.workers or 'CPU count'}")
    lines.append(f"config hash: {fingerprint(cfg, inputs)}")
    return lines


def _print_summary(console: Any, manifest: dict[str, Any], out: Path, seconds: float) -> None:
    from ..stages.shard import imbalance

    t = manifest["totals"]
    rate = t["docs"] / t["seconds"] if t["seconds"] else float("nan")
    row = (
        str(t["shards"]),
        str(t["docs"]),
        f"{t['text_bytes'] / 1e6:.2f}",
        f"{t['bytes'] / 1e6:.2f}",
        str(t["bad"]),
        str(t["blank_lines"]),
        f"{imbalance(manifest):.3f}",
        f"{rate:,.0f}",
    )
    columns = ("shards", "docs", "text MB", "zstd MB", "bad", "blank", "max/mean", "docs/s")
    console.print(render.table(f"shard -> {out}", columns, [row], left=0))
    if t["bad"]:
        console.print(f"bad records by reason: {t['bad_by_reason']}; set aside in {out / 'quarantine'}")
    console.print(f"manifest: {out / 'manifest.json'}")
