"""The ``eval`` stage: lm-evaluation-harness on a Hugging Face model, run the way the InstructLM model card runs it.

One ``lm_eval.simple_evaluate`` call per task group (model card: zero-shot piqa, hellaswag, winogrande;
five-shot social_iqa, ai2_arc, openbookqa, boolq, mmlu) with ``add_bos_token=True``, greedy generation
and batch size ``auto``. Every task's dataset is loaded before the model, so a dataset missing from an
offline cache stops the run at once with the dataset's name and the command that downloads it.

Output in ``RUN/eval/``: lm-eval's result JSON per group (``<group>.json``), ``manifest.json`` and
``results.md``, our scores next to the paper's (``ipt_hpc/data/paper_results.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, read_json, write_json_atomic
from ..config import EvalConfig, ExecutionConfig, config_hash
from ..errors import IptError
from ..layout import RunLayout, state_dir
from ..stages.decontam_index import contaminated_docs
from ..stages.eval_tasks import TaskDataset, load_tasks, model_args, task_datasets, task_manager

GEN_KWARGS = {"do_sample": False}  # greedy, as the model card's --gen_kwargs do_sample=False
MANIFEST = "manifest.json"
TABLE = "results.md"
log = logging.getLogger("ipt_hpc.model.evaluate")


@dataclass(frozen=True)
class GroupPlan:
    """One ``simple_evaluate`` call: the tasks of a group, their few-shot count and the model's arguments."""

    name: str
    tasks: tuple[str, ...]
    num_fewshot: int | None
    model_args: dict[str, Any] = field(hash=False)
    batch_size: int | str = "auto"

    def lm_eval_command(self, cfg: EvalConfig) -> str:
        """The equivalent ``lm_eval`` command line (the model card's, plus our extra settings)."""
        parts = [
            "lm_eval --model hf",
            f"--model_args {shlex.quote(render_args(self.model_args))}",
            f"--gen_kwargs {render_args(GEN_KWARGS)}",
            f"--tasks {shlex.quote(','.join(self.tasks))}",
            f"--batch_size {self.batch_size}",
        ]
        if self.num_fewshot is not None:
            parts.append(f"--num_fewshot {self.num_fewshot}")
        if cfg.include_path:
            parts.append("--include_path " + " ".join(shlex.quote(p) for p in cfg.include_path))
        if cfg.device:
            parts.append(f"--device {shlex.quote(cfg.device)}")
        if cfg.limit is not None:
            parts.append(f"--limit {cfg.limit}")
        return " ".join(parts)


def render_args(args: dict[str, Any]) -> str:
    """``{"a": 1, "b": True}`` -> ``a=1,b=True`` (lm-eval's ``--model_args`` syntax)."""
    return ",".join(f"{k}={v}" for k, v in args.items())


def _check_batch_size(value: int | str) -> int | str:
    text = str(value)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()) or (text.isdigit() and int(text) > 0):
        return int(text) if text.isdigit() else text
    raise IptError(f"eval.batch_size: {value!r} is not a positive int, 'auto' or 'auto:N'")


def plan(cfg: EvalConfig, groups: Sequence[str] | None = None) -> list[GroupPlan]:
    """The ``simple_evaluate`` calls to make for ``groups`` (default: every group of ``cfg.groups``)."""
    names = list(groups) if groups else list(cfg.groups)
    unknown = [g for g in names if g not in cfg.groups]
    if unknown:
        raise IptError(f"eval: unknown group(s) {', '.join(unknown)}; configured: {', '.join(cfg.groups) or 'none'}")
    args = model_args(cfg)
    batch = _check_batch_size(cfg.batch_size)
    return [
        GroupPlan(g, tuple(cfg.groups[g].tasks), cfg.groups[g].num_fewshot, args, batch) for g in dict.fromkeys(names)
    ]


def resolve_device(device: str | None) -> str:
    """``None`` -> ``cuda`` when a GPU is visible, else ``cpu`` (HFLM itself would ask for CUDA regardless)."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_bos(model: str, *, trust_remote_code: bool = False) -> int:
    """Make sure the tokenizer, loaded as HFLM loads it with ``add_bos_token=True``, prepends BOS.

    The InstructLM models were trained with BOS first; lm-eval only asks the tokenizer for special tokens,
    so a tokenizer that ignores the request would silently score every request without BOS.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            model, add_bos_token=True, use_fast=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise IptError(f"eval: cannot load the tokenizer of {model} ({exc})") from exc
    if tok.bos_token_id is None:
        raise IptError(
            f"eval: the tokenizer of {model} has no BOS token, but the model card evaluates with add_bos_token=True;"
            " re-export the model with its tokenizer's bos_token set (or set eval.require_bos=false to run anyway)"
        )
    ids = tok("Question: is this evaluated with BOS?\nAnswer:")["input_ids"]
    if not ids or ids[0] != tok.bos_token_id:
        raise IptError(
            f"eval: the tokenizer of {model} does not prepend BOS ({tok.bos_token!r}, id {tok.bos_token_id}) even with"
            f" add_bos_token=True (first ids: {ids[:5]}); fix the exported tokenizer's post-processor"
            " (or set eval.require_bos=false to run anyway)"
        )
    return int(tok.bos_token_id)


def prefetch(cfg: EvalConfig, groups: Sequence[str] | None = None) -> list[TaskDataset]:
    """Download the datasets of the selected groups into the HF cache (run where there is network)."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        raise IptError("eval --prefetch downloads datasets: unset HF_DATASETS_OFFLINE and HF_HUB_OFFLINE")
    names = list(groups) if groups else list(cfg.groups)
    specs = [t for g in names for t in _group(cfg, g).tasks]
    tm = task_manager(cfg)
    load_tasks(tm, specs, cfg=cfg)
    return task_datasets(tm, specs)


def _group(cfg: EvalConfig, name: str) -> Any:
    if name not in cfg.groups:
        raise IptError(f"eval: unknown group {name!r}; configured: {', '.join(cfg.groups)}")
    return cfg.groups[name]


# ---------------------------------------------------------------------------------------------- run


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def fingerprint(cfg: EvalConfig, p: GroupPlan, contaminated: dict[str, list[str]] | None = None) -> str:
    """What decides a group's scores: the model's files, the plan and settings, lm-eval's version (and the
    contaminated documents that split each task into its clean subset)."""
    model = Path(cfg.model or "")
    files = (
        sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.iterdir() if f.is_file())
        if model.is_dir()
        else []
    )
    return config_hash(
        {
            "model": str(model.resolve()) if model.is_dir() else cfg.model,
            "model_files": files,
            "tasks": list(p.tasks),
            "num_fewshot": p.num_fewshot,
            "model_args": {k: str(v) for k, v in p.model_args.items()},
            "limit": cfg.limit,
            "seed": cfg.seed,
            "include_path": [str(Path(x).resolve()) for x in cfg.include_path],
            "lm_eval": _lm_eval_version(),
            **({"contaminated": {t: contaminated.get(t, []) for t in sorted(contaminated)}} if contaminated else {}),
        }
    )


def _dumps(obj: Any) -> bytes:
    from lm_eval.utils import handle_non_serializable

    return (json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n").encode()


def run(
    cfg: EvalConfig,
    out_dir: str | os.PathLike[str],
    groups: Sequence[str] | None = None,
    force: bool = False,
    *,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every selected group; write ``<group>.json``, ``manifest.json`` and ``results.md`` in ``out_dir``.

    A group whose JSON exists with the same fingerprint is skipped unless ``force``. All datasets are
    loaded (and the tokenizer's BOS checked) before the model, so an offline node fails in seconds.
    """
    say = log_fn or log.info
    plans = plan(cfg, groups)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.exists() else {"groups": {}}
    contaminated = contaminated_docs(out.parent)  # the run's decontaminate logs, when eval writes RUN/eval
    todo = []
    for p in plans:
        fp = fingerprint(cfg, p, contaminated)
        done = manifest["groups"].get(p.name, {})
        if not force and done.get("fingerprint") == fp and (out / f"{p.name}.json").exists():
            say(f"eval {p.name}: done already ({out / (p.name + '.json')}); --force redoes it")
            continue
        todo.append((p, fp))
    if todo:
        if cfg.require_bos and cfg.add_bos_token:
            bos = check_bos(cfg.model or "", trust_remote_code=bool(cfg.model_args.get("trust_remote_code", False)))
            say(f"eval: tokenizer prepends BOS (id {bos}) with add_bos_token=True")
        tm = task_manager(cfg)
        loaded = load_tasks(tm, [t for p, _ in todo for t in p.tasks], cfg=cfg)
        handler = _file_log(out)
        try:
            for p, fp in todo:
                _evaluate_group(cfg, p, fp, tm, loaded, out, manifest, say, contaminated)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    table = write_table(out)
    say(f"eval: {table}")
    return {"out": str(out), "groups": [p.name for p in plans], "ran": [p.name for p, _ in todo], "table": str(table)}


JOB_NAME = "ipt-eval"


def output_dir(cfg: EvalConfig, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where an evaluation writes: ``eval.out``; else ``RUN/eval`` of ``run_dir``; else the eval folder of
    the run that holds the model folder (``RUN/hf`` -> ``RUN/eval``)."""
    if cfg.out:
        return Path(cfg.out)
    if run_dir:
        return RunLayout.of(run_dir).eval
    if not Path(cfg.model or "").is_dir():
        raise IptError("eval: say where to write: --run RUN (results in RUN/eval) or --out DIR")
    return RunLayout.of(Path(cfg.model or "").resolve().parent).eval


def job_execution(execution: ExecutionConfig) -> ExecutionConfig:
    """The execution settings of an evaluation: on Slurm, one GPU unless the config says otherwise."""
    if execution.backend != "slurm" or execution.slurm.gpus_per_node is not None:
        return execution
    return execution.model_copy(update={"slurm": execution.slurm.model_copy(update={"gpus_per_node": 1})})


def job_log_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The Slurm logs of an evaluation job writing to ``out_dir``."""
    return state_dir(out_dir) / "logs"


def submit(
    cfg: EvalConfig,
    execution: ExecutionConfig,
    out_dir: str | os.PathLike[str],
    groups: Sequence[str] | None = None,
    force: bool = False,
) -> str:
    """:func:`run` as one Slurm job (settings from :func:`job_execution`); returns its job id."""
    from ..execution.backends import submit_job

    return submit_job(
        run,
        cfg,
        str(out_dir),
        groups,
        force,
        cfg=job_execution(execution),
        log_dir=job_log_dir(out_dir),
        job_name=JOB_NAME,
    )


def _file_log(out: Path) -> logging.Handler:
    """lm-eval's and our log lines also go to ``RUN/eval/_state/eval.log``."""
    state_dir(out).mkdir(exist_ok=True)
    handler = logging.FileHandler(state_dir(out) / "eval.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _evaluate_group(
    cfg: EvalConfig,
    p: GroupPlan,
    fp: str,
    tm: Any,
    loaded: dict[str, list[Any]],
    out: Path,
    manifest: dict[str, Any],
    say: Callable[[str], None],
    contaminated: dict[str, list[str]] | None = None,
) -> None:
    import lm_eval

    say(f"eval {p.name}: {','.join(p.tasks)}, num_fewshot {p.num_fewshot}; as: {p.lm_eval_command(cfg)}")
    started = time.time()
    random_seed, numpy_seed, torch_seed, fewshot_seed = cfg.seed
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=dict(p.model_args),
        tasks=[obj for spec in p.tasks for obj in loaded[spec]],
        num_fewshot=p.num_fewshot,
        batch_size=p.batch_size,
        max_batch_size=cfg.max_batch_size,
        device=resolve_device(cfg.device),
        limit=cfg.limit,
        log_samples=cfg.log_samples or contaminated is not None,  # per-document scores: the clean subsets
        gen_kwargs=dict(GEN_KWARGS),
        task_manager=tm,
        random_seed=random_seed,
        numpy_random_seed=numpy_seed,
        torch_random_seed=torch_seed,
        fewshot_random_seed=fewshot_seed,
    )
    if results is None:  # not rank 0 of a distributed run: rank 0 writes
        return
    samples = results.pop("samples", None)
    seconds = time.time() - started
    results["ipt_hpc"] = {
        "group": p.name,
        "tasks": list(p.tasks),
        "num_fewshot": p.num_fewshot,
        "lm_eval_command": p.lm_eval_command(cfg),
        "fingerprint": fp,
        "seconds": round(seconds, 1),
    }
    if contaminated is not None and samples is not None:
        results["ipt_hpc"]["clean"] = clean_scores(samples, contaminated)
    atomic_write_bytes(out / f"{p.name}.json", _dumps(results))
    if samples is not None and cfg.log_samples:
        atomic_write_bytes(out / f"{p.name}.samples.json", _dumps(samples))
    manifest["groups"][p.name] = {
        "file": f"{p.name}.json",
        "fingerprint": fp,
        "model": cfg.model,
        "tasks": list(p.tasks),
        "num_fewshot": p.num_fewshot,
        "lm_eval": _lm_eval_version(),
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out / MANIFEST, manifest)
    say(f"eval {p.name}: {out / (p.name + '.json')} ({seconds:.0f} s)")


def clean_scores(samples: dict[str, list[dict[str, Any]]], contaminated: dict[str, list[str]]) -> dict[str, Any]:
    """Per task, the mean of each per-document metric over all its scored documents and over the clean subset
    (the documents no training record of the run held), as GPT-3 reported them side by side."""
    out: dict[str, Any] = {}
    for task, rows in sorted(samples.items()):
        hit = set(contaminated.get(task, []))
        metrics = [m for m in (rows[0].get("metrics", []) if rows else []) if all(isinstance(r.get(m), (int, float))
                                                                                 for r in rows)]  # fmt: skip
        clean = [r for r in rows if str(r.get("doc_id")) not in hit]
        entry: dict[str, Any] = {
            "docs": len(rows),
            "contaminated_docs": len(rows) - len(clean),
            "clean_docs": len(clean),
        }
        for m in metrics:
            entry[m] = sum(float(r[m]) for r in rows) / len(rows)
            entry[f"{m}_clean"] = sum(float(r[m]) for r in clean) / len(clean) if clean else None
        out[task] = entry
    return out


# ---------------------------------------------------------------------------------------------- table


def _shots(n: int | None) -> str:
    return "each task's default shots" if n is None else f"{n}-shot"


def paper_results() -> dict[str, Any]:
    """The paper's reported scores (``ipt_hpc/data/paper_results.json``; null where not yet filled in)."""
    return json.loads(resources.files("ipt_hpc").joinpath("data/paper_results.json").read_text(encoding="utf-8"))


def _score(metrics: dict[str, Any], metric: str | None) -> tuple[str, float, Any] | None:
    for name in [metric] if metric else ["acc_norm", "acc"]:
        value = metrics.get(f"{name},none")
        if isinstance(value, (int, float)):
            return name, float(value), metrics.get(f"{name}_stderr,none")
    return None


def _cell(score: tuple[str, float, Any] | None) -> str:
    if score is None:
        return "–"
    _, value, stderr = score
    err = f" ± {100 * stderr:.1f}" if isinstance(stderr, (int, float)) else ""
    return f"{100 * value:.1f}{err}"


def _paper_cell(value: Any) -> str:
    return "–" if value is None else f"{float(value):.1f}"


def write_table(out_dir: str | os.PathLike[str]) -> Path:
    """``results.md``: every group JSON in ``out_dir`` side by side with the paper's numbers."""
    out = Path(out_dir)
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).exists() else {"groups": {}}
    runs = {g: read_json(out / info["file"]) for g, info in manifest["groups"].items() if (out / info["file"]).exists()}
    paper = paper_results()
    models = paper["models"]
    merged: dict[str, dict[str, Any]] = {}
    nshot: dict[str, Any] = {}
    requested: list[str] = []
    clean: dict[str, dict[str, Any]] = {}
    for res in runs.values():
        ours = res.get("ipt_hpc", {})
        clean.update(ours.get("clean", {}))
        nshot.update({t: ours.get("num_fewshot") for t in ours.get("tasks", [])})  # groups (mmlu): the group's shots
        nshot.update(res.get("n-shot", {}))
        merged.update(res.get("results", {}))
        requested += ours.get("tasks", [])
    extra = ["ours, clean subset", "eval docs in training"] if clean else []
    header = ["Benchmark", "lm-eval task", "n-shot", "metric", "ours", *extra, *models]

    def clean_cells(task: str, score: tuple[str, float, Any] | None) -> list[str]:
        if not clean:
            return []
        c = clean.get(task)
        if c is None or score is None:
            return ["–", "–"]
        value = c.get(f"{score[0]}_clean")
        return ["–" if value is None else f"{100 * value:.1f}", f"{c['contaminated_docs']:,} of {c['docs']:,}"]

    rows = []
    listed = set()
    for bench in paper["benchmarks"]:
        task = bench["task"]
        listed.add(task)
        score = _score(merged[task], bench.get("metric")) if task in merged else None
        shots = nshot.get(task, "") if score else ""
        rows.append(
            [bench["label"], task, str(shots), score[0] if score else (bench.get("metric") or ""), _cell(score)]
            + clean_cells(task, score)
            + [_paper_cell(bench["scores"].get(m)) for m in models]
        )
    for task in dict.fromkeys(requested):  # tasks we ran that the paper does not report (custom tasks)
        if task in listed or task not in merged:
            continue
        score = _score(merged[task], None)
        rows.append(
            [task, task, str(nshot.get(task, "")), score[0] if score else "", _cell(score)]
            + clean_cells(task, score)
            + ["–"] * len(models)
        )
    any_res = next(iter(runs.values()), {})
    model = next((info.get("model") for info in manifest["groups"].values()), None)
    lines = [
        "# Evaluation results",
        "",
        f"Model: `{model}`" if runs else "No group has been evaluated yet.",
        "",
        f"lm-evaluation-harness {any_res.get('lm_eval_version', '')}, run as the InstructLM model card does:"
        " `add_bos_token=True`, greedy (`do_sample=False`), batch size auto. Scores in %, ± standard error.",
        "",
    ]
    limits = {g: r.get("config", {}).get("limit") for g, r in runs.items() if r.get("config", {}).get("limit")}
    if limits:
        lines += [f"**Not comparable with the paper**: run with `limit` {limits} (a subset of each task).", ""]
    if clean:
        lines += [
            "Clean subset: the task's documents that no training record of this run held (13-gram matches found by"
            " `decontaminate`, whatever its policy did with them; docs/decontamination.md), scored alone.",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    src = paper.get("source")
    lines += [
        "",
        "Paper columns: "
        + (src if src else "not yet filled in (`ipt_hpc/data/paper_results.json`; see docs/evaluation.md)")
        + ". –: not run here / not reported.",
        "Groups: "
        + ", ".join(f"{g} ({_shots(r.get('ipt_hpc', {}).get('num_fewshot'))}: `{g}.json`)" for g, r in runs.items()),
        "",
    ]
    path = out / TABLE
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
