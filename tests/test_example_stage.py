"""docs/design.md's example stage (docs/example_stage.py) runs on the local executor through the same
``run_stage`` as the built-in stages, and is the text the design document shows."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from ipt_hpc.atomic import read_json
from ipt_hpc.config import load_config
from ipt_hpc.execution import StageState, run_stage, shard_name
from ipt_hpc.records import read_records

DOCS = REPO / "docs"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch):
    """docs/example_stage.py, importable here and in the local executor's worker processes."""
    monkeypatch.syspath_prepend(str(DOCS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(DOCS), os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop("example_stage", None)
    return importlib.import_module("example_stage")


def test_design_md_shows_the_examples_verbatim() -> None:
    for name in ("example_stage.py", "example_cli.py"):
        source = (DOCS / name).read_text(encoding="utf-8")
        assert len(source.splitlines()) <= 40
        assert source in (DOCS / "design.md").read_text(encoding="utf-8"), name


def test_example_command_runs_the_stage(example, corpus: Path, tmp_path: Path, capsys) -> None:
    """The example's CLI module, registered on a parser as ipt_hpc.cli registers its commands."""
    import argparse

    cli = importlib.import_module("example_cli")
    run = tmp_path / "run"
    shard = ("shard", "--input", str(corpus), "--text-field", "content", "--num-shards", "2", "--executor", "debug")
    assert run_cli(*shard, "--out", str(run / "raw")).returncode == 0
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["wordcount", "--run", str(run), "--executor", "debug"])
    assert args.handler(args) == 0
    words = sum(len(r["text"].split()) for k in range(2) for r in read_records(run / "raw" / shard_name(k, 2)))
    assert f"{words:,} words in {run / 'wordcount'}" in capsys.readouterr().out


def test_example_stage_runs_on_the_local_executor(example, corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shard = ("shard", "--input", str(corpus), "--text-field", "content", "--num-shards", "3", "--executor", "local")
    proc = run_cli(*shard, "--out", str(run / "raw"))
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(None, None, {"execution.backend": "local"})
    result = run_stage(example.STAGE, cfg, run)
    assert result["submitted"] == 3
    raw = [r for k in range(3) for r in read_records(run / "raw" / shard_name(k, 3))]
    out = [r for k in range(3) for r in read_records(run / "wordcount" / shard_name(k, 3))]
    assert [r["id"] for r in out] == [r["id"] for r in raw]
    assert [r["words"] for r in out] == [len(r["text"].split()) for r in raw]
    manifest = read_json(run / "wordcount" / "manifest.json")
    assert manifest == result["manifest"]
    assert manifest["totals"]["words"] == sum(len(r["text"].split()) for r in raw)
    assert manifest["totals"]["records"] == len(raw)

    # one shard redone (--shards 0 --force): the same bytes, the manifest rebuilt with the same totals
    first = shard_name(0, 3)
    state = StageState(run / "wordcount")
    kept = (run / "wordcount" / first).read_bytes()
    result = run_stage(example.STAGE, cfg, run, "0", force=True)
    assert result["submitted"] == 1 and state.is_done(first)
    assert (run / "wordcount" / first).read_bytes() == kept
    assert read_json(run / "wordcount" / "manifest.json")["totals"]["words"] == manifest["totals"]["words"]
