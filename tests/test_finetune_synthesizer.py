"""finetune-synthesizer: a brief real training run through the CLI, and the shipped tiny synthesizer
run through the real synthesize stage (no scripted generator anywhere)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, shard_corpus

from ipt_hpc.atomic import read_json
from ipt_hpc.config import load_config
from ipt_hpc.execution import run_stage, shard_name
from ipt_hpc.records import read_records
from ipt_hpc.stages import synthesize

pytest.importorskip("transformers")

pytestmark = pytest.mark.train  # starts training runs: not in make test-fast

DATA = REPO / "data" / "synth-ft"
SHIPPED = REPO / "models" / "tiny-synthesizer"
TINY = [  # a smaller model than the shipped one: the CLI test only proves that the stage learns
    "--set",
    "finetune_synth.hidden_size=64",
    "--set",
    "finetune_synth.intermediate_size=192",
    "--set",
    "finetune_synth.num_layers=2",
    "--set",
    "finetune_synth.vocab_size=1024",
    "--set",
    "finetune_synth.seq_len=512",
    "--set",
    "finetune_synth.max_positions=512",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_data(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_synth_ft_data.py"), "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )


def test_data_generator_is_deterministic_and_heldout_disjoint(tmp_path: Path) -> None:
    make_data(tmp_path / "a")
    make_data(tmp_path / "b")
    for split in ("train", "heldout"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        # the shipped files are what the documented command makes
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes()
    train = read_jsonl(tmp_path / "a" / "train.jsonl")
    held = read_jsonl(tmp_path / "a" / "heldout.jsonl")
    doc = lambda rec: rec["id"].rsplit("#", 1)[0]  # noqa: E731
    assert len(train) > 1500 and len(held) > 50
    assert not {doc(r) for r in train} & {doc(r) for r in held}
    assert len({r["id"] for r in train}) == len(train)
    for rec in train + held:
        assert 1 <= len(rec["pairs"]) <= 4 and all(p["Q"] and p["A"] for p in rec["pairs"])
        assert all(len(p["A"].split()) <= 13 for p in rec["pairs"])  # capped answers (12 words + "...")
    assert any("\nOptions:\n- " in p["Q"] for r in train for p in r["pairs"])


def test_cli_brief_training_learns_and_saves_a_loadable_synthesizer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "synth"
    args = ["--data", str(DATA / "train.jsonl"), "--heldout", str(DATA / "heldout.jsonl"), "--out", str(out)]
    # 40 steps (the time budget only a safety net): the same learning however busy the machine is
    proc = run_cli(
        "finetune-synthesizer", *args, "--max-minutes", "5", "--seed", "1", *TINY, "--set", "finetune_synth.steps=40",
        "--set", "finetune_synth.eval_contexts=8", "--set", "finetune_synth.eval_max_new_tokens=48",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = read_json(out / "finetune.json")
    curve = [p["loss"] for p in info["loss_curve"]]
    assert info["stopped_by"] == "steps" and info["steps"] == 40, info
    assert curve[-1] < curve[0] - 2.0 and info["final_loss"] < info["first_loss"], curve  # ln(1024) = 6.9 at first
    assert info["seed"] == 1 and info["data"]["checksum"].startswith("sha256:")
    assert "finetune-synthesizer" in info["command"] and "--max-minutes" in info["command"]
    assert info["eval"]["contexts"] == 8 and 0 <= info["eval"]["parse_rate"] <= 1
    assert not (tmp_path / "synth.partial").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok) and tok.bos_token_id is not None and tok.eos_token_id is not None
    ids = tok(" <CON> x </CON>\n\n<QUE> q <ANS> a </END>", add_special_tokens=False)["input_ids"]
    assert "<QUE>" in tok.decode(ids, skip_special_tokens=True)  # tags survive decoding


def test_the_time_budget_stops_training_cleanly(tmp_path: Path) -> None:
    """Without a step count the schedule runs by time: 3 s of training, then a clean stop and a complete folder."""
    out = tmp_path / "synth"
    args = ["--data", str(DATA / "train.jsonl"), "--heldout", str(DATA / "heldout.jsonl"), "--out", str(out)]
    proc = run_cli(
        "finetune-synthesizer", *args, "--max-minutes", "0.05", *TINY,
        "--set", "finetune_synth.eval_contexts=1", "--set", "finetune_synth.eval_max_new_tokens=4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = read_json(out / "finetune.json")
    assert info["stopped_by"] == "time budget" and info["steps"] >= 1, info
    assert (out / "config.json").exists() and not (tmp_path / "synth.partial").exists()
    # an existing output is not replaced without --force
    again = run_cli("finetune-synthesizer", *args, "--steps", "1", *TINY)
    assert again.returncode == 2 and "--force" in again.stderr


def test_killed_or_failed_training_leaves_no_complete_output(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipt_hpc.launch", "finetune-synthesizer", "--data", str(DATA / "train.jsonl"),
         "--out", str(out), "--steps", "100000", *TINY],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = tmp_path / "synth.partial" / "train_log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.stat().st_size):
        time.sleep(0.1)
    assert proc.poll() is None and log.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "context": "text", "pairs": [{"Q": "q"}]}\n')
    failed = run_cli("finetune-synthesizer", "--data", str(bad), "--out", str(out), "--steps", "5", *TINY)
    assert failed.returncode == 2 and "bad.jsonl:1" in failed.stderr
    assert not out.exists()


def test_shipped_tiny_synthesizer_writes_parsable_pairs_through_the_synthesize_stage(tmp_path: Path) -> None:
    info = read_json(SHIPPED / "finetune.json")
    assert info["eval"]["parse_rate"] >= 0.5
    held = read_jsonl(DATA / "heldout.jsonl")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"content": r["context"]}) + "\n" for r in held))
    run = tmp_path / "run"
    sets = {"shard.inputs": [str(inp)], "shard.text_field": "content", "shard.num_shards": 2}
    sets |= {"execution.backend": "debug", "synth.model": str(SHIPPED), "synth.rounds": 2}
    sets |= {"synth.max_model_len": 1024, "synth.max_new_tokens": 128, "synth.chunk_docs": 16}
    cfg = load_config(None, None, sets)
    shard_corpus(cfg, run / "raw")
    run_stage(synthesize.STAGE, cfg, run)
    recs = [r for k in range(2) for r in read_records(run / "synth" / shard_name(k, 2))]
    assert len(recs) == len(held)
    with_pairs = sum(1 for r in recs if r["pairs"])
    assert with_pairs >= 0.3 * len(recs), f"{with_pairs}/{len(recs)} documents with pairs"
    assert any(r["round"] == 1 and r["chain"] and r["pairs"] for r in recs)  # few-shot chains were used
    assert all(r["error"] is None for r in recs)


def test_same_seed_and_steps_give_the_same_model(tmp_path: Path) -> None:
    data = tmp_path / "small.jsonl"
    data.write_text("".join((DATA / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:200]))
    blobs = []
    for name in ("a", "b"):
        args = ["--data", str(data), "--out", str(tmp_path / name), "--steps", "12", "--seed", "3", "--threads", "1"]
        proc = run_cli("finetune-synthesizer", *args, *TINY)
        assert proc.returncode == 0, proc.stderr
        blobs.append((tmp_path / name / "model.safetensors").read_bytes())
        assert (tmp_path / name / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert blobs[0] == blobs[1]
