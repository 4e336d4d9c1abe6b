"""pipeline: every configured stage built before any ran, run in order (local) or chained (Slurm)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_docs, run_cli, write_jsonl

from ipt_hpc.atomic import read_json
from ipt_hpc.config import load_config
from ipt_hpc.pipeline import available_steps

pytest.importorskip("transformers")


def test_steps_follow_the_config(tmp_path: Path) -> None:
    from tokenizer_fixture import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    base = {"shard.num_shards": 3, "tokenize.tokenizer": str(tok)}
    names = lambda cfg: [s.name for s in available_steps(cfg, tmp_path / "run")]  # noqa: E731
    assert names(load_config(None, None, {"shard.num_shards": 3})) == ["shard", "report"]
    assert names(load_config(None, None, base)) == ["shard", "tokenize raw", "mixture", "report"]
    with_synth = {**base, "synth.model": "some/model", "synth.convert_share": 0.5}
    steps = available_steps(load_config(None, None, with_synth), tmp_path / "run")
    assert [s.name for s in steps] == [
        "shard",
        "synthesize",
        "templify",
        "tokenize augmented",
        "tokenize raw",
        "mixture",
        "report",
    ]
    assert [s.run.num_shards for s in steps[1:5]] == [3, 3, 3, 3]  # known before the shard stage ran
    assert [s.run.out_folder for s in steps[3:5]] == ["tokens/augmented", "tokens/raw"]
    # a train section adds training, export and evaluation before the report
    steps = available_steps(load_config(None, None, {**with_synth, "train.train_iters": 5}), tmp_path / "run")
    assert [s.name for s in steps][-5:] == ["mixture", "train", "export", "eval", "report"]
    # decontaminate: the index once, the raw shards before synthesis, the pairs after it; the stages after each
    # read its output (docs/decontamination.md)
    steps = available_steps(load_config(None, None, {**with_synth, "decontaminate.enabled": True}), tmp_path / "run")
    assert [s.name for s in steps][:7] == [
        "shard", "decontaminate-index", "decontaminate raw-clean", "synthesize", "decontaminate synth-clean",
        "templify", "tokenize augmented",
    ]  # fmt: skip
    synth, templ = steps[3].run, steps[5].run
    assert (synth.in_folder, templ.in_folder, templ.stage_config.raw_stage) == ("raw-clean", "synth-clean", "raw-clean")
    assert steps[6].run.in_folder == "augmented"
    no_synth = available_steps(load_config(None, None, {**base, "decontaminate.enabled": True}), tmp_path / "run")
    assert [s.name for s in no_synth][:4] == ["shard", "decontaminate-index", "decontaminate raw-clean", "tokenize raw"]
    assert no_synth[3].run.in_folder == "raw-clean"


def test_the_demo_decontaminates_and_dry_run_lists_it(tmp_path: Path) -> None:
    proc = run_cli("pipeline", "--config", "configs/demo.yaml", "--run", str(tmp_path / "run"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr  # the console's lines
    assert "step 2: decontaminate-index (one job on local)" in out
    assert "step 3: decontaminate raw-clean (job arrays on local)" in out
    assert "step 5: decontaminate synth-clean (job arrays on local)" in out


def test_pipeline_runs_shard_to_mixture_locally(tmp_path: Path) -> None:
    from tiny_model import tiny_llama

    model = tiny_llama(tmp_path / "model")
    inp = write_jsonl(tmp_path / "in.jsonl", make_docs(40, seed=5, max_words=30))
    run = tmp_path / "run"
    sets = {
        "shard.inputs": f"[{inp}]",
        "shard.text_field": "content",
        "shard.num_shards": 2,
        "synth.model": str(model),
        "synth.max_new_tokens": 6,
        "synth.max_model_len": 256,
        "synth.convert_share": 0.5,
        "tokenize.tokenizer": str(model),
        "tokenize.workers": 1,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = run_cli("pipeline", "--run", str(run), "--executor", "debug", *args)
    assert proc.returncode == 0, proc.stderr
    for folder in ("raw", "synth", "augmented", "tokens/augmented", "tokens/raw"):
        assert (run / folder / "manifest.json").exists(), folder
    report = read_json(run / "mixture.json")
    docs = sum(g["documents"] for g in report["groups"].values())
    assert docs == 40 and sum(g["weight"] for g in report["groups"].values()) == pytest.approx(1.0)


def test_slurm_submissions_print_as_a_table() -> None:
    """``pipeline --executor slurm`` prints what it submitted as a table: step, job ids, tasks, nodes, dependency."""
    from rich.console import Console

    from ipt_hpc.cli.pipeline import submissions_table

    results = [
        {"step": "shard", "job_ids": ["510"], "tasks": 1, "nodes": 1, "dependency": None},
        {"step": "synthesize", "submitted": 4, "job_ids": ["511"], "tasks": 2, "nodes": 1, "dependency": "afterok:510"},
        {"step": "templify", "submitted": 0, "backend": "slurm", "nodes": 1, "dependency": "afterok:511"},
        {"step": "train", "job_ids": ["513"], "tasks": 1, "nodes": 2, "dependency": "afterok:512"},
    ]
    console = Console(record=True, width=120)
    console.print(submissions_table(results))
    lines = [line for line in console.export_text().splitlines() if "│" in line or "┃" in line]
    rows = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in lines]
    assert rows[0] == ["step", "job ids", "tasks", "nodes", "dependency"]
    assert rows[1:] == [
        ["shard", "510", "1", "1", "-"],
        ["synthesize", "511", "2 (4 shards)", "1", "afterok:510"],
        ["templify", "-", "-", "-", "afterok:511"],
        ["train", "513", "1", "2", "afterok:512"],
    ]
