"""The evaluation texts ``decontaminate`` looks for, and the run's n-gram index of them (built once per run).

Texts come from the eval tasks of the run's config, loaded through lm-eval's task manager (the datasets from
the local cache; offline, a missing one is one message naming the task and the prefetch command), and from
``decontaminate.references`` (JSON Lines or Parquet files with a text field, for benchmarks outside lm-eval).
Per scored document of a task (lm-eval's ``eval_docs``, numbered as lm-eval numbers them in its samples):

* ``question``: lm-eval's decontamination query (the task's ``doc_to_decontamination_query`` when it sets
  ``should_decontaminate``, e.g. piqa's goal), else its ``doc_to_text`` (the prompt as the model sees it);
* ``answer``: the gold target (the gold choice's text for a multiple-choice task);
* ``question+answer``: both, so an n-gram straddling the question and its answer is found too.

The index lives in ``RUN/decontaminate-index/``: ``index.npz``, ``vocab.txt``, ``segments.jsonl`` and
``manifest.json`` (the settings, lm-eval's version, each task's split, document count and dataset
fingerprint, each reference file's sha256, the exact n-gram count and the index's size in memory).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ..atomic import atomic_write_bytes, read_json, write_json_atomic
from ..config import Config
from ..errors import IptError
from .decontam_ngrams import NgramIndex, NgramSettings, Segment

INDEX_FOLDER = "decontaminate-index"


def settings_of(cfg: Config) -> NgramSettings:
    d = cfg.decontaminate
    return NgramSettings(n=d.n, lowercase=d.lowercase, nfkc=d.nfkc, punctuation=d.punctuation, min_words=d.min_words)


def eval_task_names(cfg: Config) -> list[str]:
    """The tasks to decontaminate against: ``decontaminate.tasks``, else every task of the eval groups."""
    if cfg.decontaminate.tasks is not None:
        return list(dict.fromkeys(cfg.decontaminate.tasks))
    return list(dict.fromkeys(t for g in cfg.eval.groups.values() for t in g.tasks))


def _gold(task: Any, doc: Any) -> str | None:
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, list):
            target = target[0] if target else None
        if isinstance(target, int):
            return str(choices[target]) if 0 <= target < len(choices) else None
        return str(target)
    if isinstance(target, list):
        return " ".join(map(str, target))
    return None if target is None else str(target)


def _question(task: Any, doc: Any) -> str:
    if task.should_decontaminate():
        query = task.config.doc_to_decontamination_query
        if isinstance(query, str) and query in doc:  # a field name (piqa: goal)
            return str(doc[query])
        return str(task.doc_to_decontamination_query(doc))
    text = task.doc_to_text(doc)
    return text if isinstance(text, str) else str(text)


def _fingerprint(task: Any) -> str | None:
    docs = task.eval_docs
    return getattr(docs, "_fingerprint", None)


def task_texts(cfg: Config, info: dict[str, Any]) -> Iterator[tuple[Segment, str]]:
    """(segment, text) of every scored document of the config's eval tasks; fills ``info`` per task."""
    from .eval_tasks import DatasetUnavailable, check_task_names, offline_message, task_manager

    names = eval_task_names(cfg)
    if not names:
        return
    tm = task_manager(cfg.eval)
    check_task_names(tm, names)
    loaded: dict[str, Any] = {}
    failed: list[tuple[str, OSError]] = []
    for name in names:
        try:
            loaded.update(tm.load([name])["tasks"])
        except OSError as exc:
            failed.append((name, exc))
    if failed:
        raise DatasetUnavailable(offline_message(tm, failed, cfg.eval).replace("eval:", "decontaminate:", 1))
    for name in sorted(loaded):
        task = loaded[name]
        docs = task.eval_docs
        info[name] = {"documents": len(docs), "fingerprint": _fingerprint(task), "output_type": task.OUTPUT_TYPE}
        for i, doc in enumerate(docs):
            question, gold = _question(task, doc), _gold(task, doc)
            yield Segment(name, str(i), "question"), question
            if gold:
                yield Segment(name, str(i), "answer"), gold
                yield Segment(name, str(i), "question+answer"), f"{question} {gold}"


def reference_texts(cfg: Config, info: dict[str, Any]) -> Iterator[tuple[Segment, str]]:
    """(segment, text) of every record of ``decontaminate.references`` (task name: the file's stem)."""
    field = cfg.decontaminate.reference_text_field
    for ref in cfg.decontaminate.references:
        path = Path(ref)
        if not path.is_file():
            raise IptError(f"decontaminate.references: {path} does not exist")
        name = path.name.split(".")[0]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        rows = _read_rows(path)
        count = 0
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise IptError(f"{path}: record {i + 1} has no text field {field!r}")
            count += 1
            yield Segment(name, str(row.get("id", i)), "reference"), row[field]
        info[name] = {"documents": count, "fingerprint": f"sha256:{digest}", "file": str(path)}


def _read_rows(path: Path) -> list[Any]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise IptError(f"{path}: line {i + 1}: not JSON ({exc})") from None
    return rows


def index_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / INDEX_FOLDER


def wanted(cfg: Config) -> dict[str, Any]:
    """What an index must have been built from to be reused: settings, tasks, references."""
    return {
        "settings": settings_of(cfg).describe(),
        "tasks": eval_task_names(cfg),
        "references": [str(Path(r).resolve()) for r in cfg.decontaminate.references],
    }


def build_index(cfg: Config, run_dir: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Build the run's index unless one built from the same settings, tasks and references exists; returns its
    manifest. Raises :class:`IptError` when there is nothing to look for."""
    folder = index_folder(run_dir)
    manifest_path = folder / "manifest.json"
    want = wanted(cfg)
    if not force and manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("built_from") == want:
            return old
    import lm_eval

    started = time.time()
    info: dict[str, Any] = {}
    segments: list[Segment] = []

    def texts() -> Iterator[tuple[Segment, str]]:
        yield from task_texts(cfg, info)
        yield from reference_texts(cfg, info)

    settings = settings_of(cfg)
    index = NgramIndex.build(settings, texts())
    if not info:
        raise IptError(
            "decontaminate: no eval task and no reference file to look for"
            " (decontaminate.tasks, eval.groups, decontaminate.references)"
        )
    segments = index.segments
    summary = index.save(folder)
    lines = b"".join(orjson.dumps([s.task, s.doc, s.part], option=orjson.OPT_APPEND_NEWLINE) for s in segments)
    atomic_write_bytes(folder / "segments.jsonl", lines)
    manifest = {
        "built_from": want,
        "lm_eval_version": lm_eval.__version__,
        "tasks": info,
        **summary,
        "seconds": round(time.time() - started, 2),
    }
    write_json_atomic(manifest_path, manifest)
    return manifest


def load_index(run_dir: str | Path) -> tuple[NgramIndex, dict[str, Any]]:
    folder = index_folder(run_dir)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise IptError(f"decontaminate: no index in {folder}; the stage builds it before its shards (rerun it)")
    manifest = read_json(manifest_path)
    settings = NgramSettings(**manifest["settings"])
    segments = [Segment(*orjson.loads(line)) for line in (folder / "segments.jsonl").read_bytes().splitlines()]
    return NgramIndex.load(folder, settings, segments), manifest


def stage_manifests(run_dir: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(folder, manifest) of every complete decontaminate stage of a run."""
    for manifest in sorted(Path(run_dir).glob("*/manifest.json")):
        try:
            m = read_json(manifest)
        except (OSError, ValueError):
            continue
        if m.get("stage") == "decontaminate" and "tasks" in m:
            yield manifest.parent, m


def contaminated_docs(run_dir: str | Path) -> dict[str, list[str]] | None:
    """Per eval task, the ids of its documents that some training record of the run held (any decontaminate
    stage folder's log, whatever its action); None when the run has no decontaminate output. ``eval`` scores
    the other documents as the task's clean subset."""
    found: dict[str, set[str]] = {}
    any_stage = False
    for _, m in stage_manifests(run_dir):
        any_stage = True
        for task, r in m["tasks"].items():
            found.setdefault(task, set()).update(r.get("eval_doc_ids_hit", []))
    if not any_stage:
        return None
    return {t: sorted(ids, key=lambda d: (len(d), d)) for t, ids in sorted(found.items())}


def decontamination_rows(run_dir: str | Path) -> list[list[str]]:
    """One row per (decontaminate stage folder, eval task): group and policy, training records hit and removed,
    eval documents hit and their share of the task. For ``status``, the run report and the dataset card."""
    rows = []
    for folder, m in stage_manifests(run_dir):
        job = m.get("config", {})
        for task, r in m["tasks"].items():
            share = r.get("eval_docs_hit_share")
            rows.append([
                folder.name,
                f"{job.get('group', '?')}: {job.get('policy', '?')}",
                task,
                f"{r['training_records_hit']:,}",
                f"{r['removed']:,}",
                f"{r['eval_docs_hit']:,} of {r['eval_docs']:,}" + (f" ({share:.1%})" if share is not None else ""),
            ])  # fmt: skip
    return rows


DECONTAMINATION_HEADERS = ["folder", "group: policy", "eval task", "training records hit", "removed", "eval docs hit"]
