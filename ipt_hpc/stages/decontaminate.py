"""The ``decontaminate`` stage: the eval benchmarks' documents out of the training texts, every action logged.

Before its shards, the stage builds the run's n-gram index of the eval tasks' documents once
(:mod:`decontam_index`, the stage's plan step: in the launching process, or the coordinator job on Slurm).
Each shard task then scans its records (:mod:`decontam_ngrams`) and applies its group's policy
(``decontaminate.policy``):

* ``flag``: the record is written unchanged; the hits are only logged.
* ``drop_pair`` (synthesized records: the augmented group): a pair (its question and answer, scanned as one
  text so that a match straddling both is found) with a hit is removed from the record's ``pairs``; a hit in
  the document's own text drops the record, since its pairs came from it. Later records of its chain no
  longer name it, so templify renders the chain without it. On a record without pairs it drops the record.
* ``excise`` (lm-eval's janitor rule): each match and ``excise_window`` characters either side are cut out of
  the text, the pieces left that are longer than ``excise_min_piece`` are kept (joined by a blank line), a text
  with more than ``excise_max_hits`` matches, or with nothing left, is dropped. Pairs with a hit are removed.
* ``drop_doc``: a record with any hit is dropped.

Nothing is dropped silently: every action is a line of the shard's log, ``OUT/decontamination/<shard>.jsonl``
(record id, where: ``text`` or ``pair:K``, task, eval document id, which part of it, the matched n-gram, its
character span, action). Records keep their ids and order; the output is deterministic, so a resumed shard
skips the records it already wrote and ends with the same bytes, and its log is written whole at the end.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from ..atomic import atomic_write_bytes, write_json_atomic
from ..config import Config
from ..errors import IptError, RecordError
from ..execution import ShardContext, StageRun
from ..execution.shards import manifest_of
from ..execution.stage import Stage
from ..layout import RunLayout
from ..records import read_records
from .decontam_index import build_index, index_folder, load_index, wanted
from .decontam_ngrams import Hit, NgramIndex, excise, spans_of

FLUSH_EVERY = 1000
SCAN_BATCH = 256  # records scanned in one vectorised pass
LOG_FOLDER = "decontamination"
Policy = Literal["flag", "drop_pair", "excise", "drop_doc"]


class DecontaminateJob(BaseModel):
    """What a decontaminate task needs (JSON-serialisable; hashed into the stage's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    policy: Policy
    index: str  # the index folder
    index_of: dict[str, Any]  # what the index is built from (settings, tasks, references): part of the identity
    excise_window: int = 200
    excise_min_piece: int = 200
    excise_max_hits: int = 10


_INDEX: dict[str, tuple[float, NgramIndex]] = {}


def _index(folder: str) -> NgramIndex:
    """The index, loaded once per worker process (reloaded if it was rebuilt)."""
    manifest = Path(folder) / "manifest.json"
    if not manifest.exists():
        return load_index(Path(folder).parent)[0]  # raises: no index
    mtime = manifest.stat().st_mtime
    cached = _INDEX.get(folder)
    if cached is None or cached[0] != mtime:
        _INDEX[folder] = (mtime, load_index(Path(folder).parent)[0])
    return _INDEX[folder][1]


def log_lines(rid: str, where: str, text: str, hits: list[Hit], action: str, index: NgramIndex) -> list[dict[str, Any]]:
    """One log line per (match, eval document): the same window matching a document's question and its
    question+answer is one line."""
    seen: set[tuple[int, int, str, str]] = set()
    spans = spans_of(text, hits, index.settings)
    out = []
    for hit, span in zip(hits, spans, strict=True):
        key = (hit.start, hit.length, hit.segment.task, hit.segment.doc)
        if key in seen:
            continue
        seen.add(key)
        line = {
            "record": rid,
            "where": where,
            "task": hit.segment.task,
            "doc": hit.segment.doc,
            "part": hit.segment.part,
            "ngram": " ".join(hit.words),
            "span": list(span),
            "action": action,
        }
        out.append(line)
    return out


def pairs_of(rec: dict[str, Any]) -> list[Any] | None:
    return rec.get("pairs") if isinstance(rec.get("pairs"), list) else None


def pair_text(pair: Any) -> str:
    """A synthesized pair as one text (question, then answer): a match may straddle both."""
    return f"{pair.get('Q', '')} {pair.get('A', '')}" if isinstance(pair, dict) else str(pair)


def clean_record(
    job: DecontaminateJob,
    rec: dict[str, Any],
    hits: list[list[Hit]],
    index: NgramIndex,
    log: list[dict[str, Any]],
    counts: Counter[str],
) -> dict[str, Any] | None:
    """The record after its group's policy (None: dropped), given the hits of its text and of each of its pairs
    (in that order); appends its log lines and counts."""
    rid = str(rec.get("id"))
    text = rec["text"]
    text_hits = hits[0]
    pairs = pairs_of(rec)
    pair_hits = [(k, pair_text(pair), found) for k, (pair, found) in enumerate(zip(pairs or [], hits[1:], strict=True))
                 if found]  # fmt: skip
    if not text_hits and not pair_hits:
        return rec
    counts["records_hit"] += 1
    policy = job.policy
    drop = policy == "drop_doc" or (policy == "drop_pair" and (text_hits or pairs is None))
    action: str = policy  # the text's action, unless the record is dropped below
    out: dict[str, Any] | None = rec
    if policy == "flag":
        pass
    elif drop:
        action, out = "drop_doc", None
    else:
        if text_hits:  # excise
            windows = list({(h.start, h.length): h for h in text_hits}.values())  # one per window, as the janitor
            spans = spans_of(text, windows, index.settings)
            pieces = excise(text, spans, job.excise_window, job.excise_min_piece, job.excise_max_hits)
            if not pieces:  # too many matches, or nothing long enough left
                action, out = "drop_doc", None
            else:
                out = {**rec, "text": "\n\n".join(pieces)}
                counts["records_excised"] += 1
        if out is not None and pair_hits:
            gone = {k for k, _, _ in pair_hits}
            out = {**out, "pairs": [p for k, p in enumerate(pairs or []) if k not in gone]}
            counts["pairs_dropped"] += len(gone)
    if text_hits:
        log += log_lines(rid, "text", text, text_hits, action, index)
    for k, ptext, found in pair_hits:
        log += log_lines(rid, f"pair:{k}", ptext, found, "drop_doc" if out is None else
                         ("flag" if policy == "flag" else "drop_pair"), index)  # fmt: skip
    if out is None:
        counts["records_dropped"] += 1
    return out


def cleaned(job: DecontaminateJob, path: Path, index: NgramIndex, log: list[dict[str, Any]], counts: Counter[str]):
    """The shard's output records in order; a dropped record's id leaves the chains of the records after it.
    Records are scanned ``SCAN_BATCH`` at a time (one vectorised pass), then cleaned one by one in order."""
    dropped: set[str] = set()
    batch: list[dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        texts = [t for rec in batch for t in (rec["text"], *map(pair_text, pairs_of(rec) or []))]
        hits = index.scan_batch(texts)
        at = 0
        for rec in batch:
            n = 1 + len(pairs_of(rec) or [])
            out = clean_record(job, rec, hits[at : at + n], index, log, counts)
            at += n
            if out is None:
                dropped.add(str(rec.get("id")))
                continue
            if dropped and isinstance(out.get("chain"), list) and any(c in dropped for c in out["chain"]):
                out = {**out, "chain": [c for c in out["chain"] if c not in dropped]}
            counts["records_out"] += 1
            yield out
        batch.clear()

    for i, rec in enumerate(read_records(path)):
        if not isinstance(rec.get("text"), str):
            raise RecordError(path, i + 1, "no 'text' field")
        counts["records_in"] += 1
        batch.append(rec)
        if len(batch) >= SCAN_BATCH:
            yield from flush()
    yield from flush()


def log_path(out_dir: Path, name: str) -> Path:
    return out_dir / LOG_FOLDER / (name.removesuffix(".jsonl.zst") + ".jsonl")


def decontaminate_shard(job: DecontaminateJob, ctx: ShardContext) -> dict[str, Any]:
    """Decontaminate one shard (a task of the execution layer); resumes after the last durable record."""
    index = _index(job.index)
    log: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    stats = ctx.write_all(cleaned(job, ctx.input_path, index, log, counts), FLUSH_EVERY)
    records_of: dict[str, set[str]] = defaultdict(set)
    for entry in log:
        records_of[entry["task"]].add(entry["record"])
    atomic_write_bytes(
        log_path(ctx.run.out_dir, ctx.name), b"".join(orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE) for e in log)
    )
    return {
        **stats,
        "group": job.group,
        "policy": job.policy,
        **{
            k: counts[k]
            for k in ("records_in", "records_out", "records_hit", "records_dropped", "records_excised", "pairs_dropped")
        },
        "hits": len(log),
        "tasks_hit": {t: len(r) for t, r in sorted(records_of.items())},
    }


# -- finalize: per-task report -------------------------------------------------------------------------
def task_report(out_dir: Path, index_manifest: dict[str, Any]) -> dict[str, Any]:
    """Per eval task: training records hit and removed, and the distinct eval documents hit (a share of the
    task's documents), from the shards' logs."""
    hit_records: dict[str, set[str]] = defaultdict(set)
    removed: dict[str, set[str]] = defaultdict(set)
    docs: dict[str, set[str]] = defaultdict(set)
    for path in sorted((out_dir / LOG_FOLDER).glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            e = orjson.loads(line)
            hit_records[e["task"]].add(e["record"])
            docs[e["task"]].add(e["doc"])
            if e["action"] != "flag":
                removed[e["task"]].add(f"{e['record']}/{e['where']}" if e["action"] == "drop_pair" else e["record"])
    report = {}
    for task, info in sorted(index_manifest.get("tasks", {}).items()):
        total = info.get("documents") or 0
        report[task] = {
            "training_records_hit": len(hit_records.get(task, ())),
            "removed": len(removed.get(task, ())),
            "eval_docs_hit": len(docs.get(task, ())),
            "eval_docs": total,
            "eval_docs_hit_share": round(len(docs.get(task, ())) / total, 4) if total else None,
            "eval_doc_ids_hit": sorted(docs.get(task, ()), key=lambda d: (len(d), d)),
        }
    return report


def finalize_stage(run: StageRun) -> dict[str, Any]:
    manifest = manifest_of(run)
    index_manifest = orjson.loads((Path(run.stage_config.index) / "manifest.json").read_bytes())
    manifest["index"] = {k: index_manifest[k] for k in ("ngrams", "segments", "bytes_in_memory", "settings")}
    manifest["tasks"] = task_report(run.out_dir, index_manifest)
    write_json_atomic(run.out_dir / "manifest.json", manifest)
    return manifest


# -- coordinator ------------------------------------------------------------------------------------------
def group_of(cfg: Config, layout: RunLayout) -> str:
    d = cfg.decontaminate
    if d.group:
        return d.group
    return "augmented" if layout.stage(d.input_stage) == layout.synth else "raw"


def decontaminate_job(cfg: Config, layout: RunLayout) -> DecontaminateJob:
    d = cfg.decontaminate
    group = group_of(cfg, layout)
    policy = d.policy.get(group)
    if policy is None:
        raise IptError(f"decontaminate.policy has no entry for group {group!r} (has: {', '.join(d.policy)})")
    return DecontaminateJob(
        group=group,
        policy=policy,
        index=str(index_folder(layout.root)),
        index_of=wanted(cfg),
        excise_window=d.excise_window,
        excise_min_piece=d.excise_min_piece,
        excise_max_hits=d.excise_max_hits,
    )


def clean_folder(folder: str) -> str:
    """Where decontaminate writes what it read from ``folder`` (unless ``decontaminate.output_folder``)."""
    return f"{folder}-clean"


def output_folder(cfg: Config) -> str:
    d = cfg.decontaminate
    return d.output_folder or clean_folder(d.input_stage)


def plan(run: StageRun, cfg: Config, progress: Any = None) -> None:
    """Build the run's index once, before the shards (reused when settings, tasks and references match)."""
    build_index(cfg, run.run_dir)


STAGE = Stage(
    name="decontaminate",
    upstream="the stage that writes its input (shard or synthesize)",
    input=lambda cfg, layout: layout.stage(cfg.decontaminate.input_stage),
    output=lambda cfg, layout: layout.stage(output_folder(cfg)),
    shard_fn=decontaminate_shard,
    job=decontaminate_job,
    finalize=finalize_stage,
    plan=plan,
)
