"""The dataset card of a published run and its upload to the Hugging Face hub (the ``publish`` stage).

The card (``OUT/README.md``) is the hub's YAML metadata (license, language, configs with their data files,
features, sizes, task categories) followed by a page written from the run's own files: the synthesizer
and its revision, each stage's config hash, the recipe, the counts and the commands that reproduce it.
Nothing in it depends on the time, so it is byte-identical on rerun. :func:`push` uploads the folder with
``huggingface_hub``'s resumable large-folder upload, after checking that the hub is reachable.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..atomic import atomic_write_bytes, read_json
from ..config import Config, data_hash
from ..errors import IptError
from ..execution.state import StageState
from ..layout import RunLayout
from .decontam_index import DECONTAMINATION_HEADERS, decontamination_rows
from .mixture import group_tokens
from .publish import CARD, PARTS, SUFFIX, input_folder, schema

SIZE_CATEGORIES = (  # the hub's buckets, by rows
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)
WHAT = {
    "augmented": "instruction-augmented pre-training texts (group `augmented`) and the documents left raw"
    " (group `raw`), as the model is trained on them",
    "synth": "one row per synthesized context: its instruction-response pairs, its round and the contexts"
    " chained before it in the few-shot prompt",
    "raw": "the corpus after sharding: every document with its stable id",
}


def size_category(rows: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if rows < limit), "n>1T")


def _manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / "manifest.json"
    return read_json(path) if path.exists() else None


def published_parts(out: Path) -> dict[str, dict[str, Any]]:
    """The complete parts of a dataset folder: ``{part: its publish manifest}``."""
    return {p: m for p in PARTS if (m := _manifest(out / p)) is not None}


def model_revision(model: str | None) -> str:
    """The synthesizer's revision: a hub cache snapshot's commit, or a content hash of a local folder."""
    if not model:
        return "not recorded"
    path = Path(model)
    if not path.is_dir():
        return "hub name; revision not recorded by the run"
    if path.resolve().parent.name == "snapshots":
        return f"commit {path.resolve().name}"
    names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    return f"content {content_sha256(path, names)[:23]} (files of {model})"


def content_sha256(root: Path, names: list[str]) -> str:
    """A sha256 over the names and bytes of the files ``names`` under ``root``, in that order."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(root / name, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _parquet_sizes(files: list[Path]) -> tuple[int, int]:
    """(uncompressed data bytes, file bytes) of Parquet files, each footer read once."""
    import pyarrow.parquet as pq

    data = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        data += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return data, sum(f.stat().st_size for f in files)


def card_metadata(cfg: Config, out: Path, parts: dict[str, dict[str, Any]]) -> Any:
    """The hub's YAML metadata (:class:`huggingface_hub.DatasetCardData`) of the published parts."""
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from huggingface_hub import DatasetCardData

    p = cfg.publish
    order = [q for q in PARTS if q in parts]
    configs, infos = [], {}
    for k, part in enumerate(order):
        files = sorted((out / part).glob(f"shard-*{SUFFIX}"))
        data_bytes, file_bytes = _parquet_sizes(files)
        rows = parts[part]["totals"].get("records", 0)
        entry: dict[str, Any] = {"config_name": part, "data_files": [{"split": "train", "path": f"{part}/*{SUFFIX}"}]}
        if k == 0:
            entry["default"] = True  # what load_dataset(NAME) gives without a config name
        configs.append(entry)
        splits = datasets.SplitDict()
        splits.add(datasets.SplitInfo("train", num_bytes=data_bytes, num_examples=rows))
        features = datasets.Features.from_arrow_schema(schema(part))
        infos[part] = DatasetInfo(
            features=features, config_name=part, splits=splits, download_size=file_bytes, dataset_size=data_bytes
        )
    rows = max((m["totals"].get("records", 0) for m in parts.values()), default=0)
    tasks = ["text-generation"] + (["question-answering"] if "synth" in parts else [])
    data = DatasetCardData(
        license=p.license,
        language=list(p.language),
        size_categories=[size_category(rows)],
        task_categories=tasks,
        pretty_name=pretty_name(cfg, out),
        tags=["instruction-pretraining", "synthetic", "ipt_hpc"],
        configs=configs,
    )
    DatasetInfosDict(infos).to_dataset_card_data(data)
    return data


def pretty_name(cfg: Config, out: Path) -> str:
    return cfg.publish.pretty_name or f"{out.resolve().name} (instruction pre-training data)"


def _stage(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """A run stage folder's manifest and config hash (``?`` when the stage did not run)."""
    info = StageState(folder).read_stage() or {}
    return _manifest(folder), info.get("config_hash", "?")


def card_text(cfg: Config, run_dir: str | Path, out: Path, parts: dict[str, dict[str, Any]]) -> str:
    """The whole card: YAML metadata, then the page."""
    layout = RunLayout.of(run_dir)
    raw, raw_hash = _stage(input_folder(cfg, layout, "raw"))
    synth, synth_hash = _stage(input_folder(cfg, layout, "synth"))
    aug, aug_hash = _stage(input_folder(cfg, layout, "augmented"))
    name = pretty_name(cfg, out)
    meta = card_metadata(cfg, out, parts)
    lines = [f"# {name}", ""]
    lines += [
        f"Data of one run of [Instruction Pre-Training](https://arxiv.org/abs/2406.14491) (Cheng et al., 2024), made"
        f" with ipt_hpc from the run folder `{layout.root.resolve().name}` and written by `ipt_hpc publish`.",
        "",
        "## Configs",
        "",
        "| config | rows | Parquet files | MB on disk | what a row is |",
        "|---|---:|---:|---:|---|",
    ]
    for part, m in parts.items():
        t = m["totals"]
        lines.append(
            f"| `{part}` | {t.get('records', 0):,} | {m['num_shards']} | {t.get('bytes', 0) / 1e6:.2f} | {WHAT[part]} |"
        )
    repo = cfg.publish.repo_id or str(out)
    first = next(iter(parts), "augmented")
    lines += [
        "",
        "Fields of each config are listed under `dataset_info` above. Reading one:",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{repo}", "{first}", split="train")  # streaming=True reads one row group at a time',
        "```",
        "",
        "## Provenance",
        "",
    ]
    sj = (synth or {}).get("config", {})
    lines += [
        f"- synthesizer: `{sj.get('model', 'not recorded')}` ({sj.get('backend', '?')} backend),"
        f" revision: {model_revision(sj.get('model'))}",
        f"- stage configs (hash of what decides each stage's bytes): shard `{raw_hash}`, synthesize `{synth_hash}`,"
        f" templify `{aug_hash}`",
        f"- the whole config publish ran with (execution, plan and output folder aside): `{data_hash(cfg)}`",
    ]
    for part, m in parts.items():
        lines.append(f"- `{part}` Parquet: config `{m['config_hash']}`, one file per run shard, checksums in"
                     f" `{part}/manifest.json`")  # fmt: skip
    tj = (aug or {}).get("config", {})
    lines += ["", "## Recipe", ""]
    lines += [
        f"- synthesis: {sj.get('rounds', '?')} rounds of few-shot chaining, greedy decoding,"
        f" at most {sj.get('max_new_tokens', '?')} new tokens in a {sj.get('max_model_len', '?')}-token window",
        f"- share of documents converted: {sj.get('convert_share', '?')} (chosen by id, seed"
        f" {sj.get('select_seed', '?')}); the others stay raw",
        f"- templify: seed {tj.get('seed', '?')}, malformed pairs: {tj.get('malformed', '?')}",
    ]
    layouts = ((aug or {}).get("totals") or {}).get("layouts") or {}
    if layouts:
        lines.append("- layout mix of the augmented texts: " + ", ".join(f"{k} {v:.1%}" for k, v in layouts.items()))
    lines += ["", "## Counts", ""]
    rt, st, at = ((x or {}).get("totals") or {} for x in (raw, synth, aug))
    lines += [
        f"- documents in the corpus: {rt['docs']:,}" if "docs" in rt else "- documents in the corpus: not recorded",
        f"- synthesized contexts: {st.get('docs', 0):,}, with {st.get('pairs', 0):,} parsed pairs"
        f" ({st.get('docs_without_pairs', 0):,} contexts got none)",
        f"- texts: {at.get('augmented_texts', 0):,} instruction-augmented, {at.get('raw_texts', 0):,} raw;"
        f" {at.get('pairs', 0):,} pairs rendered, {at.get('pairs_dropped', 0):,} dropped as malformed",
    ]
    tokens = group_tokens(layout.root)
    for group, t in tokens.items():
        lines.append(f"- tokens of group `{group}`: {t['tokens']:,} in {t['documents']:,} documents")
    if not tokens:
        lines.append("- tokens per group: the run was not tokenized")
    lines += ["", "## Decontamination", ""]
    rows = decontamination_rows(layout.root)
    if rows:
        lines += [
            "13-word n-grams of the evaluation tasks' documents looked for in the training texts (`ipt_hpc"
            " decontaminate`: lowercase, NFKC, punctuation deleted; every action logged in FOLDER/decontamination/ of"
            " the run). Policy `flag` keeps the texts as they are.",
            "",
            "| " + " | ".join(DECONTAMINATION_HEADERS) + " |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines.append("The run was not decontaminated: texts may hold evaluation benchmarks' documents.")
    lines += [
        "",
        "## Reproducing",
        "",
        "With ipt_hpc and the run's config (the stage hashes above tell whether a rerun matches):",
        "",
        "```bash",
        "python -m ipt_hpc.launch pipeline --config CONFIG.yaml --run RUN",
        f"python -m ipt_hpc.launch publish --run RUN --out DIR --what {','.join(parts)}",
        "```",
        "",
        "Every stage is deterministic given its config: the same corpus, synthesizer revision and config give the"
        " same records, and publish gives the same Parquet bytes with the same pyarrow version.",
        "",
        "## Limitations",
        "",
        "The pairs were written by a model and checked only for their format, not by people; answers can be wrong.",
        "",
    ]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)


def write_card(cfg: Config, run_dir: str | Path, out: str | Path) -> Path:
    """Write ``OUT/README.md`` for the parts of ``OUT`` that are complete; refuses when none is."""
    out = Path(out)
    parts = published_parts(out)
    if not parts:
        raise IptError(f"{out}: no published part is complete yet; nothing to describe")
    path = out / CARD
    atomic_write_bytes(path, card_text(cfg, run_dir, out, parts).encode())
    return path


# -- upload -----------------------------------------------------------------------------------------
IGNORE = ["**/_state/**", "_state/**", "**/*.partial", "**/.*", ".*/**", ".cache/**"]


def upload_plan(out: str | Path) -> list[tuple[str, int]]:
    """``(path in the repo, bytes)`` of every file the upload sends: data, manifests and the card."""
    out = Path(out)
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if any(part.startswith((".", "_")) for part in rel.parts) or path.name.endswith(".partial"):
            continue
        files.append((str(rel), path.stat().st_size))
    return files


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode, or no connection to its endpoint), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout_s).close()
    except OSError as exc:
        return f"cannot reach {constants.ENDPOINT} ({exc.__class__.__name__}: {exc})"
    return None


def check_online() -> None:
    """Raise (one line) when the hub cannot be reached."""
    why = hub_unreachable()
    if why:
        raise IptError(f"offline ({why}): nothing uploaded; rerun publish --push where the network allows")


def push(out: str | Path, repo_id: str) -> None:
    """Upload the dataset folder to the hub dataset ``repo_id`` (resumable: a rerun sends what is missing).

    Offline, it raises before any transfer."""
    out = Path(out)
    if not (out / CARD).exists():
        raise IptError(f"{out}: no {CARD}; publish the run first (the card is written once every part is complete)")
    check_online()
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_large_folder(repo_id=repo_id, folder_path=str(out), repo_type="dataset", ignore_patterns=IGNORE)
