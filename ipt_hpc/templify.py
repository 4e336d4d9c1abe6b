"""The ``templify`` stage: synthesized records -> instruction-augmented pre-training texts.

Per shard: the synthesize output's chains are rebuilt from each record's ``chain`` (the ids of the
earlier entries its prompt was prefixed with), and each chain becomes one text: its entries as few-shot
examples, each a raw text followed by its pairs in a format drawn per text (:mod:`templify_formats`).
Entries without pairs stay as plain raw text, so no document is lost. Documents of the raw shard that
were not sent to synthesis (``synth.convert_share`` < 1) follow as texts of the ``raw`` group. Every
output record names its ``group`` (``augmented`` or ``raw``), so ``tokenize --record-group`` builds
one token group of each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from .atomic import write_json_atomic
from .charts import pyplot, save
from .config import Config
from .errors import IptError, RecordError
from .execution import ShardContext, StageRun, StageState, launch
from .execution.shards import manifest_of, record_options
from .records import read_records
from .synth_format import stats_histogram
from .templify_formats import ENTRY_SEPARATOR, draw_format, render_entry, rng_for

STAGE = "templify"
FLUSH_EVERY = 1000


class TemplifyJob(BaseModel):
    """What a templify task needs (JSON-serialisable; hashed into the stage's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    raw_stage: str | None


def rebuild_chains(records: list[dict[str, Any]], path: Path) -> list[list[int]]:
    """The chains of a synthesize shard as lists of record indices, each record in exactly one.

    A record's ``chain`` lists the ids of the entries before it; the chain ends at a record that no
    later record continues. Inconsistent links (an unknown or later id, a chain that does not extend
    its last entry's chain, two records continuing the same one) are errors naming the record.
    """
    index: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec["id"] in index:
            raise RecordError(path, i + 1, f"id {rec['id']!r} repeats line {index[rec['id']] + 1}")
        index[rec["id"]] = i
    continued: dict[int, int] = {}
    for i, rec in enumerate(records):
        chain = rec.get("chain") or []
        for cid in chain:
            if cid not in index or index[cid] >= i:
                raise RecordError(path, i + 1, f"chain names {cid!r}, which is not an earlier record of this shard")
        if not chain:
            continue
        last = index[chain[-1]]
        if (records[last].get("chain") or []) != chain[:-1]:
            raise RecordError(path, i + 1, f"chain does not extend the chain of {chain[-1]!r} (line {last + 1})")
        if last in continued:
            raise RecordError(path, i + 1, f"{chain[-1]!r} is already continued by line {continued[last] + 1}")
        continued[last] = i
    return [[index[c] for c in rec.get("chain") or []] + [i] for i, rec in enumerate(records) if i not in continued]


def texts_of_shard(
    job: TemplifyJob, synth_path: Path, raw_path: Path | None, stats: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Output records of one shard, in a fixed order: augmented chains, then unconverted raw texts."""
    records = list(read_records(synth_path))
    for i, rec in enumerate(records):
        if not isinstance(rec.get("text"), str) or not isinstance(rec.get("pairs"), list):
            raise RecordError(synth_path, i + 1, "not a synthesize record (needs 'text' and 'pairs')")
    formats: Counter[str] = Counter()
    families: dict[str, Counter[str]] = {"intro": Counter(), "qa": Counter()}
    kinds: Counter[str] = Counter()
    pairs_per_text: list[int] = []
    for chain in rebuild_chains(records, synth_path):
        tail = records[chain[-1]]
        rng = rng_for(tail["id"], job.seed)
        fmt = draw_format(rng)
        parts, n = [], 0
        for k in chain:
            text, pair_kinds = render_entry(records[k]["text"], records[k]["pairs"], fmt, rng)
            parts.append(text)
            kinds.update(pair_kinds)
            n += len(pair_kinds)
        name = fmt.name if n else "plain"
        formats[name] += 1
        if n:
            families["intro"][fmt.intro] += 1
            families["qa"][fmt.qa] += 1
        pairs_per_text.append(n)
        yield {
            "id": tail["id"],
            "group": "augmented",
            "docs": [records[k]["id"] for k in chain],
            "pairs": n,
            "format": name,
            "text": ENTRY_SEPARATOR.join(parts),
        }
    pairs_in = sum(len(r["pairs"]) for r in records)
    if sum(pairs_per_text) != pairs_in:  # an invariant of render_entry: every pair is rendered once
        raise IptError(f"{synth_path}: {pairs_in} pairs in, {sum(pairs_per_text)} rendered")
    raw_texts = 0
    if raw_path is not None:
        seen = {r["id"] for r in records}
        for rec in read_records(raw_path):
            if rec["id"] in seen:
                seen.discard(rec["id"])
                continue
            raw_texts += 1
            yield {
                "id": rec["id"],
                "group": "raw",
                "docs": [rec["id"]],
                "pairs": 0,
                "format": "raw",
                "text": rec["text"],
            }
        if seen:
            raise IptError(f"{synth_path}: {len(seen)} records (e.g. {sorted(seen)[0]!r}) are not in {raw_path}")
    stats.update(
        synth_docs=len(records),
        augmented_texts=len(pairs_per_text),
        raw_texts=raw_texts,
        pairs_in=pairs_in,
        pairs=sum(pairs_per_text),
        texts_without_pairs=pairs_per_text.count(0),
        formats=dict(formats),
        intro=dict(families["intro"]),
        qa=dict(families["qa"]),
        pair_kinds=dict(kinds),
        pairs_per_text=stats_histogram(pairs_per_text),
    )


def templify_shard(job: TemplifyJob, ctx: ShardContext) -> dict[str, Any]:
    """Templify one shard (a task of the execution layer); resumes after the last durable record."""
    raw_path = Path(ctx.run.run_dir) / job.raw_stage / ctx.name if job.raw_stage else None
    if raw_path is not None and not raw_path.exists():
        raise IptError(f"{ctx.name}: raw shard {raw_path} is missing (templify.raw_stage={job.raw_stage!r})")
    writer = ctx.open_output()
    skip = writer.records  # output is deterministic: the first `skip` texts are already durable
    stats: dict[str, Any] = {}
    for n, rec in enumerate(texts_of_shard(job, ctx.input_path, raw_path, stats)):
        if n < skip:
            continue
        writer.write(rec)
        if writer.records % FLUSH_EVERY == 0:
            writer.flush()
            ctx.report(writer.records)
    return {**writer.close().to_json(), **stats}


# -- finalize: stage manifest with totals and charts ------------------------------------------------
def finalize_stage(run: StageRun) -> dict[str, Any]:
    """The stage manifest (texts, pairs, formats, pairs per text summed over shards) and two PNG charts."""
    manifest = manifest_of(run)
    totals = manifest["totals"]
    for key in ("formats", "intro", "qa", "pair_kinds"):  # most used first
        totals[key] = dict(sorted(totals.get(key, {}).items(), key=lambda kv: -kv[1]))
    totals.setdefault("pairs_per_text", {})
    totals["distinct_formats"] = len([f for f in totals["formats"] if f not in ("plain", "raw")])
    manifest["charts"] = write_charts(run.out_dir, totals)
    write_json_atomic(run.out_dir / "manifest.json", manifest)
    return manifest


def write_charts(out_dir: Path, totals: dict[str, Any]) -> list[str]:
    """``formats.png`` (texts per intro and QA style) and ``pairs_per_text.png``; [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "intro", "intro style"), (axes[1], "qa", "question/answer style")):
        items = sorted(totals[key].items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="#4C72B0")
        ax.set_title(f"augmented texts by {title}")
        ax.set_xlabel("texts")
    written.append(save(fig, out_dir / "formats.png"))
    hist = sorted(totals["pairs_per_text"].items(), key=lambda kv: int(kv[0].rstrip("+")))
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    ax.bar([k for k, _ in hist], [v for _, v in hist], color="#55A868")
    ax.set_title("instruction-response pairs per augmented text")
    ax.set_xlabel("pairs")
    ax.set_ylabel("texts")
    written.append(save(fig, out_dir / "pairs_per_text.png"))
    return written


# -- coordinator ------------------------------------------------------------------------------------
def stage_run(cfg: Config, run_dir: str | Path, num_shards: int | None = None) -> StageRun:
    """The stage for ``run_dir``; ``num_shards`` when synthesize has not run yet (pipeline)."""
    t = cfg.templify
    run_dir = Path(run_dir)
    if num_shards is None:
        info = StageState(run_dir / t.input_stage).read_stage()
        if info is None:
            raise IptError(f"templify: {run_dir / t.input_stage} holds no stage output; run synthesize first")
        num_shards = info["num_shards"]
    job = TemplifyJob(seed=t.seed, raw_stage=t.raw_stage)
    return StageRun(
        STAGE,
        str(run_dir),
        t.output_folder,
        t.input_stage,
        num_shards,
        templify_shard,
        job,
        finalize_fn=finalize_stage,
        **record_options(cfg.records),
    )


def run(cfg: Config, run_dir: str | Path, spec: str = "all", **kw: Any) -> dict[str, Any]:
    return launch(stage_run(cfg, run_dir), spec, cfg.execution, **kw)
