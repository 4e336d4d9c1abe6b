"""The ``templify`` stage: synthesized records -> instruction-augmented pre-training texts.

Per shard: the synthesize output's chains are rebuilt from each record's ``chain`` (the ids of the
earlier entries its prompt was prefixed with), and each chain becomes one text: its entries as few-shot
examples in a layout and patterns drawn per text (:mod:`templify_formats`, the reference's behaviour).
An entry without pairs (none synthesized, or all malformed and dropped) is cut out of its chain and
becomes a plain text of its own, as in the reference, so no document is lost. Documents of the raw shard that
were not sent to synthesis (``synth.convert_share`` < 1) follow as texts of the ``raw`` group. Every
output record names its ``group`` (``augmented`` or ``raw``), so ``tokenize --record-group`` builds
one token group of each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..atomic import write_json_atomic
from ..charts import pyplot, save
from ..config import Config
from ..errors import IptError, RecordError
from ..execution import ShardContext, StageRun
from ..execution.shards import manifest_of
from ..execution.stage import Stage
from ..layout import RunLayout
from ..records import read_records
from .synth_format import stats_histogram
from .templify_formats import classify_all, draw_layout, draw_style, render_entry, rng_for

FLUSH_EVERY = 1000


class TemplifyJob(BaseModel):
    """What a templify task needs (JSON-serialisable; hashed into the stage's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    raw_stage: str | None
    malformed: Literal["drop", "keep"] = "drop"


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
    """Output records of one shard, in a fixed order: per chain its text, then its entries without pairs
    as plain texts; then the unconverted raw texts."""
    records = list(read_records(synth_path))
    for i, rec in enumerate(records):
        if not isinstance(rec.get("text"), str) or not isinstance(rec.get("pairs"), list):
            raise RecordError(synth_path, i + 1, "not a synthesize record (needs 'text' and 'pairs')")
    formats: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    malformed: dict[str, int] = {}
    pairs_per_text: list[int] = []
    for chain in rebuild_chains(records, synth_path):
        rng = rng_for(records[chain[-1]]["id"], job.seed)
        style = draw_style(rng)
        entries = [classify_all(records[k]["pairs"], style, rng, job.malformed == "keep", malformed) for k in chain]
        shown = [(k, e) for k, e in zip(chain, entries, strict=True) if e]
        if shown:
            draw_layout(style, entries, rng)
            text = style.chain_sep.join(render_entry(records[k]["text"], e, style) for k, e in shown)
            n = sum(len(e) for _, e in shown)
            kinds.update(p.kind for _, e in shown for p in e)
            formats[style.name] += 1
            pairs_per_text.append(n)
            yield {
                "id": records[shown[-1][0]]["id"],
                "group": "augmented",
                "docs": [records[k]["id"] for k, _ in shown],
                "pairs": n,
                "format": style.name,
                "text": text,
            }
        for k, e in zip(chain, entries, strict=True):
            if not e:  # no pairs (or none left): the document as it is, a text of its own (the reference's way)
                formats["plain"] += 1
                pairs_per_text.append(0)
                rid = records[k]["id"]
                yield {
                    "id": rid,
                    "group": "augmented",
                    "docs": [rid],
                    "pairs": 0,
                    "format": "plain",
                    "text": records[k]["text"],
                }
    pairs_in = sum(len(r["pairs"]) for r in records)
    dropped = sum(malformed.values()) if job.malformed == "drop" else 0
    if sum(pairs_per_text) + dropped != pairs_in:  # every pair is rendered once or counted as dropped
        raise IptError(f"{synth_path}: {pairs_in} pairs in, {sum(pairs_per_text)} rendered and {dropped} dropped")
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
        augmented_texts=sum(1 for n in pairs_per_text if n),
        raw_texts=raw_texts,
        pairs_in=pairs_in,
        pairs=sum(pairs_per_text),
        pairs_dropped=dropped,
        malformed=dict(malformed),
        texts_without_pairs=pairs_per_text.count(0),
        formats=dict(formats),
        pair_kinds=dict(kinds),
        pairs_per_text=stats_histogram(pairs_per_text),
    )


def templify_shard(job: TemplifyJob, ctx: ShardContext) -> dict[str, Any]:
    """Templify one shard (a task of the execution layer); resumes after the last durable record."""
    raw_path = RunLayout.of(ctx.run.run_dir).stage(job.raw_stage) / ctx.name if job.raw_stage else None
    if raw_path is not None and not raw_path.exists():
        raise IptError(f"{ctx.name}: raw shard {raw_path} is missing (templify.raw_stage={job.raw_stage!r})")
    stats: dict[str, Any] = {}
    written = ctx.write_all(texts_of_shard(job, ctx.input_path, raw_path, stats), FLUSH_EVERY)
    return {**written, **stats}


# -- finalize: stage manifest with totals and charts ------------------------------------------------
def finalize_stage(run: StageRun) -> dict[str, Any]:
    """The stage manifest (texts, pairs, layouts, malformed pairs, pairs per text summed over shards) and
    two PNG charts."""
    manifest = manifest_of(run)
    totals = manifest["totals"]
    for key in ("formats", "malformed", "pair_kinds"):  # most used first
        totals[key] = dict(sorted(totals.get(key, {}).items(), key=lambda kv: -kv[1]))
    totals.setdefault("pairs_per_text", {})
    texts = sum(v for k, v in totals["formats"].items() if k not in ("plain", "raw"))
    totals["layouts"] = {k: round(v / texts, 4) for k, v in totals["formats"].items() if k not in ("plain", "raw")}
    manifest["charts"] = write_charts(run.out_dir, totals)
    write_json_atomic(run.out_dir / "manifest.json", manifest)
    return manifest


def write_charts(out_dir: Path, totals: dict[str, Any]) -> list[str]:
    """``layouts.png`` (texts per layout, malformed pairs by reason) and ``pairs_per_text.png``; [] without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (
        (axes[0], {k: v for k, v in totals["formats"].items() if k != "raw"}, "texts by layout", "texts"),
        (axes[1], totals["malformed"] or {"none": 0}, "malformed pairs by reason", "pairs"),
    )
    for ax, counts, title, unit in panels:
        items = sorted(counts.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="#4C72B0")
        ax.set_title(title)
        ax.set_xlabel(unit)
    written.append(save(fig, out_dir / "layouts.png"))
    hist = sorted(totals["pairs_per_text"].items(), key=lambda kv: int(kv[0].rstrip("+")))
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    ax.bar([k for k, _ in hist], [v for _, v in hist], color="#55A868")
    ax.set_title("instruction-response pairs per augmented text")
    ax.set_xlabel("pairs")
    ax.set_ylabel("texts")
    written.append(save(fig, out_dir / "pairs_per_text.png"))
    return written


# -- coordinator ------------------------------------------------------------------------------------
def templify_job(cfg: Config, layout: RunLayout) -> TemplifyJob:
    t = cfg.templify
    return TemplifyJob(seed=t.seed, raw_stage=t.raw_stage, malformed=t.malformed)


STAGE = Stage(
    name="templify",
    upstream="synthesize",
    input=lambda cfg, layout: layout.stage(cfg.templify.input_stage),
    output=lambda cfg, layout: layout.stage(cfg.templify.output_folder),
    shard_fn=templify_shard,
    job=templify_job,
    finalize=finalize_stage,
)
