"""Shared fixtures: small corpora made on the fly, and a helper to run the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "can",
    "more",
    "about",
    "time",
    "up",
    "out",
    "them",
    "model",
    "data",
    "shard",
    "corpus",
    "token",
    "pair",
    "question",
    "answer",
    "instruction",
    "response",
    "cluster",
    "node",
    "array",
    "job",
    "record",
]


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 400) -> list[dict]:
    """``n`` RefinedWeb-like documents with varied lengths and some non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        if i % 7 == 3:
            words.insert(1, "naïve café 東京 ✓")
        docs.append({"content": " ".join(words), "url": f"https://example.org/{seed}/{i}", "n": i})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipt_hpc.launch", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=300
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``, make test): every test module runs on one worker, so its module-
    and session-scoped fixtures (trained checkpoints, a planned run) are built once; and every module that has a
    Slurm test runs on one "slurm" worker, one test after another, since the local cluster is shared (the chaos
    drill sets its node DOWN: no other Slurm test may overlap it). A module with ``XDIST_SPREAD = True`` shares no
    fixture: its tests go to any worker, its Slurm tests to the Slurm one."""
    if not hasattr(config, "workerinput"):  # not an xdist worker: nothing to group
        return
    slurm = {item.module.__name__ for item in items if item.get_closest_marker("slurm")}
    for item in items:
        module = item.module.__name__
        if item.get_closest_marker("slurm") or (module in slurm and not getattr(item.module, "XDIST_SPREAD", False)):
            group = "slurm"
        elif getattr(item.module, "XDIST_SPREAD", False):  # tests that share no fixture: each on any worker
            group = item.nodeid
        else:
            group = module
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder with two JSON Lines files (one gzipped) holding 300 documents."""
    import gzip

    folder = tmp_path / "corpus"
    docs = make_docs(300, seed=1)
    write_jsonl(folder / "a.jsonl", docs[:180])
    folder.mkdir(exist_ok=True)
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        for d in docs[180:]:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    return folder


@pytest.fixture(autouse=True)
def _workers_find_test_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes (submitit local jobs, Slurm tasks) unpickle task functions defined in tests/."""
    here = str(Path(__file__).resolve().parent)
    current = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", here + (os.pathsep + current if current else ""))


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama synthesizer with its tokenizer (tests/tiny_model.py), made once."""
    from tiny_model import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("model") / "synth")


def shard_corpus(cfg, out: Path, *, force: bool = False) -> dict:
    """The shard stage into the folder ``out`` through the path the CLI takes (``run_stage`` on the run
    folder ``out.parent``, the stage's folder named ``out.name``); returns the manifest."""
    from ipt_hpc.execution import run_stage
    from ipt_hpc.stages import shard

    cfg = cfg.model_copy(update={"shard": cfg.shard.model_copy(update={"output_folder": Path(out).name})})
    result = run_stage(shard.STAGE, cfg, Path(out).parent, force=force)
    return result["manifest"]


def sigkill_shard_task(stage_dir: Path, name: str, records: int, timeout: float = 120) -> None:
    """Start ``run-shard`` on a prepared stage folder (as a hand-written Slurm array task runs it), wait until
    the shard's running marker reports ``records`` durable records, then SIGKILL the task's process group."""
    import signal
    import time

    from ipt_hpc.execution import StageState

    proc = subprocess.Popen(
        [sys.executable, "-m", "ipt_hpc.launch", "run-shard", "--stage-dir", str(stage_dir)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = StageState(stage_dir)
    deadline = time.time() + timeout
    while time.time() < deadline and (state.read("running", name) or {}).get("records", 0) < records:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the task finished before it could be killed; make the shard longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
