"""Verify a Megatron indexed dataset against its source JSONL, with megatron-core's own reader.

    python tools/verify_indexed.py RUN/tokens/GROUP [--samples 100] [--seed 0]

Opens ``RUN/tokens/GROUP.{bin,idx}`` (or a single shard prefix) with ``megatron.core``'s
``IndexedDataset``; checks document count, lengths, pointers and file size against the index and the
tokenize manifest; decodes N random documents with the group's tokenizer copy and compares them
with the source record text. Exit code 1 on any mismatch, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np


def source_texts(run_dir: Path, in_folder: str, field: str, shard_names: list[str]) -> list[str]:
    """Texts of the source shards, in dataset order (with the tokenize policies' skips applied)."""
    from ipt_hpc.records import read_records

    texts = []
    for name in shard_names:
        for rec in read_records(run_dir / in_folder / name):
            text = rec.get(field)
            if isinstance(text, str):
                texts.append(text)
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("group", help="RUN/tokens/GROUP (the folder of a tokenized group)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from ipt_hpc.atomic import read_json
    from ipt_hpc.execution import shard_name
    from ipt_hpc.execution.submit import load_stage_run
    from ipt_hpc.indexed import paths

    group = Path(args.group)
    try:
        run = load_stage_run(group)
        manifest = read_json(group / "manifest.json")
    except Exception as exc:  # noqa: BLE001 - report and exit 2
        print(f"verify: {group}: {exc}", file=sys.stderr)
        return 2
    prefix = group.parent / group.name
    problems: list[str] = []
    ds = IndexedDataset(str(prefix))
    lengths = ds.sequence_lengths
    bin_path, _ = paths(prefix)
    itemsize = np.dtype(ds.index.dtype).itemsize
    if len(ds) != manifest["documents"]:
        problems.append(f"{len(ds)} documents, manifest says {manifest['documents']}")
    if int(lengths.sum()) != manifest["tokens"]:
        problems.append(f"{int(lengths.sum())} tokens, manifest says {manifest['tokens']}")
    if bin_path.stat().st_size != int(lengths.sum()) * itemsize:
        problems.append(f"{bin_path} has {bin_path.stat().st_size} bytes, index says {int(lengths.sum()) * itemsize}")
    pointers = ds.index.sequence_pointers
    expected = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * itemsize)]) if len(ds) else pointers
    if not np.array_equal(pointers, expected):
        problems.append("sequence pointers do not follow the lengths")
    job = run.stage_config
    tok = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    names = [shard_name(k, run.num_shards) for k in range(run.num_shards)]
    texts = source_texts(Path(run.run_dir), run.in_folder, job.text_field, names)
    if job.empty_text == "skip":
        texts = [t for t in texts if t]
    if len(texts) != len(ds):
        problems.append(f"{len(texts)} source texts with text, {len(ds)} documents")
    rng = random.Random(args.seed)
    for i in sorted(rng.sample(range(min(len(ds), len(texts))), min(args.samples, len(ds), len(texts)))):
        ids = ds[i].tolist()
        want = tok(texts[i], add_special_tokens=False)["input_ids"]
        want = (
            ([job.bos_id] if job.bos_id is not None else []) + want + ([job.eod_id] if job.eod_id is not None else [])
        )
        if ids != want:
            problems.append(f"document {i}: ids differ from the tokenizer's ({len(ids)} vs {len(want)} tokens)")
        elif tok.decode(ids, skip_special_tokens=True) != tok.decode(want, skip_special_tokens=True):
            problems.append(f"document {i}: decodes differently")
    for p in problems[:20]:
        print(f"MISMATCH {p}")
    print(
        f"{prefix}: {len(ds):,} documents, {int(lengths.sum()):,} tokens; {args.samples} sampled: "
        f"{'OK' if not problems else f'{len(problems)} problem(s)'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
