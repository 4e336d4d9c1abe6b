"""``report``: one page per run, markdown and HTML, with the numbers and charts of every stage it finds.

Sections appear for what the run holds: the stage table (shards, records, tokens, task and wall time,
throughput), synthesis stats (pairs per document, parse failures, truncations), the templified texts
(layouts, malformed pairs, pairs per text), decontamination per eval task, the mixture's token shares, the
training loss curve and the evaluation scores (with each task's clean subset when the run was decontaminated).
Charts are PNG files next to the page (``RUN/report/``), so the folder is self-contained.
"""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import atomic_write_bytes, read_json
from .charts import pyplot, save
from .execution.state import StageState, wall_span
from .layout import RunLayout, state_dir
from .status import find_stages

Block = tuple[Any, ...]  # ("h2", text) | ("p", text) | ("table", headers, rows) | ("img", file, alt)


# -- gathering ---------------------------------------------------------------------------------------
def stage_rows(run: Path) -> list[list[str]]:
    """One row per stage folder: shards done, records, tokens, summed task time, wall span, records/s."""
    rows = []
    for folder in find_stages(run):
        info = read_json(state_dir(folder) / "stage.json")
        shards = StageState(folder).read_all("done")
        records = sum(s.get("records", s.get("docs", 0)) for s in shards)
        tokens = sum(s.get("tokens", 0) for s in shards)
        task_s = sum(s.get("seconds", 0.0) for s in shards)
        wall = wall_span(shards) or 0.0
        total = info.get("num_shards", len(shards))
        rows.append(
            [
                info.get("stage", folder.name),
                str(folder.relative_to(run)),
                f"{len(shards)}/{total}",
                f"{records:,}",
                f"{tokens:,}" if tokens else "-",
                f"{task_s:,.1f}",
                f"{wall:,.1f}",
                f"{records / task_s:,.0f}" if task_s else "-",
            ]
        )
    return rows


def plan_blocks(run: Path) -> list[Block]:
    """The plan made before the run (``plan``) beside what the run measured: wall time and output size."""
    from .planning.compare import fmt_bytes, fmt_seconds, load_plan, ratio, rows

    plan = load_plan(run)
    if plan is None:
        return []

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    table = [
        [
            row["stage"],
            fmt_seconds(row["planned_wall_s"]),
            fmt_seconds(row["actual_wall_s"]),
            r(ratio(row["actual_wall_s"], row["planned_wall_s"])),
            fmt_bytes(row["planned_bytes"]),
            fmt_bytes(row["actual_bytes"]),
            r(ratio(row["actual_bytes"], row["planned_bytes"])),
        ]
        for row in rows(run, plan)
    ]
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(plan["calibrated"]))
    headers = ["stage", "planned wall", "actual wall", "actual/plan", "planned size", "actual size", "actual/plan"]
    text = (
        f"From RUN/plan.json: {plan['docs']:,} documents ({plan['docs_source']}), calibrated {made}."
        " Actual wall time is the pipeline step's own (or its shards' span); '-' where the stage has not finished."
    )
    return [("h2", "Plan vs actual"), ("p", text), ("table", headers, table)]


def _bar_chart(path: Path, labels: list[str], values: list[float], title: str, xlabel: str, ylabel: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
    ax.bar(labels, values, color="#4C72B0")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    save(fig, path)
    return True


def synthesis_blocks(run: Path, out: Path) -> list[Block]:
    manifest = RunLayout.of(run).synth / "manifest.json"
    if not manifest.exists():
        return []
    t = read_json(manifest)["totals"]
    hist: dict[str, int] = t.get("pairs_per_doc", {})
    dropped: dict[str, int] = t.get("dropped", {})
    docs = t.get("docs", 0)
    gen_s = t.get("generate_s", t.get("engine_s", 0.0))  # engine_s: runs from before streaming
    rows = [
        ["documents synthesized", f"{docs:,}"],
        ["documents left raw (not converted)", f"{t.get('not_converted', 0):,}"],
        ["instruction-response pairs", f"{t.get('pairs', 0):,}"],
        ["pairs per document (mean)", f"{t.get('pairs', 0) / docs:.2f}" if docs else "-"],
        ["documents without pairs", f"{t.get('docs_without_pairs', 0):,}"],
        ["parse failures (pairs dropped), by reason", ", ".join(f"{k}: {v:,}" for k, v in dropped.items()) or "none"],
        ["engine errors", f"{t.get('errors', 0):,}"],
        ["documents over the token budget (truncated or skipped)", f"{t.get('over_budget', 0):,}"],
        ["prompt tokens / generated tokens", f"{t.get('prompt_tokens', 0):,} / {t.get('tokens', 0):,}"],
        ["generated tokens/s (per task, generation time)", f"{t.get('tokens', 0) / gen_s:,.1f}" if gen_s else "-"],
    ]
    blocks: list[Block] = [("h2", "Synthesis"), ("table", ["", "value"], rows)]
    order = sorted(hist, key=lambda k: int(k.rstrip("+")))
    if hist and _bar_chart(
        out / "pairs_per_doc.png", order, [hist[k] for k in order], "pairs per document", "pairs", "documents"
    ):
        blocks.append(("img", "pairs_per_doc.png", "pairs per synthesized document"))
    return blocks


def templify_blocks(run: Path, out: Path) -> list[Block]:
    manifest = RunLayout.of(run).augmented / "manifest.json"
    if not manifest.exists():
        return []
    m = read_json(manifest)
    t = m["totals"]
    rows = [
        ["instruction-augmented texts", f"{t['augmented_texts']:,}"],
        ["raw texts (not converted)", f"{t['raw_texts']:,}"],
        ["pairs rendered / pairs in", f"{t['pairs']:,} / {t['pairs_in']:,}"],
        ["malformed pairs (dropped)", ", ".join(f"{k}: {v:,}" for k, v in t.get("malformed", {}).items()) or "none"],
        ["entries without pairs (kept as plain text)", f"{t['texts_without_pairs']:,}"],
        ["layout mix", ", ".join(f"{k} {v:.1%}" for k, v in t.get("layouts", {}).items()) or "-"],
        ["pair kinds", ", ".join(f"{k}: {v:,}" for k, v in t["pair_kinds"].items()) or "-"],
    ]
    blocks: list[Block] = [("h2", "Instruction-augmented texts"), ("table", ["", "value"], rows)]
    for chart in m.get("charts", []):
        shutil.copyfile(manifest.parent / chart, out / f"templify_{chart}")
        blocks.append(("img", f"templify_{chart}", chart.removesuffix(".png").replace("_", " ")))
    return blocks


def decontamination_blocks(run: Path) -> list[Block]:
    """Per decontaminate stage and eval task: the training records that held the task's documents, those
    removed, and the share of the task found (docs/decontamination.md)."""
    from .stages.decontam_index import DECONTAMINATION_HEADERS, decontamination_rows

    rows = decontamination_rows(run)
    if not rows:
        return []
    note = (
        "13-word n-grams of the eval tasks' documents found in the training texts; every action is logged in"
        " FOLDER/decontamination/. With policy flag the texts were kept as they are."
    )
    return [("h2", "Decontamination"), ("p", note), ("table", DECONTAMINATION_HEADERS, rows)]


def mixture_blocks(run: Path, out: Path) -> list[Block]:
    path = RunLayout.of(run).mixture
    if not path.exists():
        return []
    groups = read_json(path)["groups"]
    total = sum(g["tokens"] for g in groups.values()) or 1
    rows = [
        [
            name,
            f"{g['documents']:,}",
            f"{g['tokens']:,}",
            f"{g['tokens'] / total:.1%}",
            f"{g['weight']:.4f}",
            f"{g['epochs']:.2f}" if "epochs" in g else "-",
        ]
        for name, g in groups.items()
    ]
    headers = ["group", "documents", "tokens", "share of tokens", "blend weight", "epochs"]
    blocks: list[Block] = [("h2", "Mixture"), ("table", headers, rows)]
    names = list(groups)
    if _bar_chart(out / "mixture.png", names, [groups[n]["weight"] for n in names], "blend weights", "group", "weight"):
        blocks.append(("img", "mixture.png", "blend weight per token group"))
    return blocks


def training_blocks(run: Path, out: Path) -> list[Block]:
    """Last and first loss, throughput and the loss curve, from the train stage's own log and plot."""
    from .model.train.metrics import plot_loss, read_steps

    log = RunLayout.of(run).train_log
    by_iteration = read_steps(log) if log.exists() else {}  # a step redone after a resume counts once
    if not by_iteration:
        return []
    steps = [by_iteration[i] for i in sorted(by_iteration)]
    last = steps[-1]
    rows = [
        ["iterations", f"{last['iteration']:,}"],
        ["final loss", f"{last['loss']:.4f}"],
        ["first loss", f"{steps[0]['loss']:.4f}"],
        ["tokens/s (last interval)", f"{last.get('tokens_per_s') or 0:,.0f}"],
        ["MFU (last interval)", f"{last['mfu']:.1%}" if last.get("mfu") is not None else "-"],
    ]
    blocks: list[Block] = [("h2", "Training"), ("table", ["", "value"], rows)]
    if plot_loss(by_iteration, out / "loss.png"):
        blocks.append(("img", "loss.png", "training loss curve"))
    return blocks


def evaluation_blocks(run: Path) -> list[Block]:
    folder = RunLayout.of(run).eval
    files = [p for p in sorted(folder.glob("*.json")) if p.name != "manifest.json"] if folder.is_dir() else []
    rows = []
    with_clean = False
    for path in files:
        data = read_json(path)
        clean = data.get("ipt_hpc", {}).get("clean", {})
        with_clean = with_clean or bool(clean)
        for task, metrics in sorted(data.get("results", {}).items()):
            for key, value in sorted(metrics.items()):
                name = key.split(",")[0]
                if name in ("acc", "acc_norm", "exact_match") and isinstance(value, (int, float)):
                    c = clean.get(task, {})
                    subset = c.get(f"{name}_clean")
                    rows.append([
                        path.stem, task, name, f"{100 * value:.1f}",
                        "-" if subset is None else f"{100 * subset:.1f}",
                        f"{c['contaminated_docs']:,} of {c['docs']:,}" if c else "-",
                    ])  # fmt: skip
    if not rows:
        return []
    headers = ["group", "task", "metric", "score"]
    if with_clean:
        headers += ["clean subset", "eval docs in training"]
    else:
        rows = [r[:4] for r in rows]
    return [("h2", "Evaluation (lm-evaluation-harness)"), ("table", headers, rows)]


# -- rendering ---------------------------------------------------------------------------------------
def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


STYLE = (
    "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "th{background:#f0f0f0}img{display:block;margin:0.5em 0 1.5em;max-width:100%}"
    "img[data-loaded=no]{outline:3px solid #c00}"
)
# marks every image loaded or not (a broken chart is outlined in red, and checkable from the DOM)
SCRIPT = (
    "for(const i of document.images){const m=()=>i.dataset.loaded=(i.naturalWidth>0?'yes':'no');"
    "i.complete?m():(i.onload=m,i.onerror=m)}"
)


def to_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{STYLE}</style>"]
    parts.append(f"</head><body><h1>{e(title)}</h1>")
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            parts.append(f"<h2>{e(block[1])}</h2>")
        elif kind == "p":
            parts.append(f"<p>{e(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            parts.append(f"<img src='{e(block[1])}' alt='{e(block[2])}'>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def build(run_dir: str | Path) -> dict[str, Any]:
    """Write ``RUN/report/report.md`` and ``report.html`` (and their PNGs); returns paths and sections."""
    run = Path(run_dir)
    if not run.is_dir():
        from .errors import IptError

        raise IptError(f"report: {run} is not a run folder")
    out = RunLayout.of(run).report
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    blocks: list[Block] = [("p", f"Run folder {run.resolve()}; generated {stamp} by ipt_hpc {__version__}.")]
    headers = ["stage", "folder", "shards done", "records", "tokens", "task time (s)", "wall (s)", "records/s"]
    rows = stage_rows(run)
    blocks += [("h2", "Stages"), ("table", headers, rows) if rows else ("p", "No stage has run yet.")]
    blocks += plan_blocks(run)
    blocks += synthesis_blocks(run, out)
    blocks += templify_blocks(run, out)
    blocks += decontamination_blocks(run)
    blocks += mixture_blocks(run, out)
    blocks += training_blocks(run, out)
    blocks += evaluation_blocks(run)
    title = f"Instruction Pre-Training run: {run.name}"
    atomic_write_bytes(out / "report.md", to_markdown(title, blocks).encode())
    atomic_write_bytes(out / "report.html", to_html(title, blocks).encode())
    sections = [b[1] for b in blocks if b[0] == "h2"]
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "sections": sections}
