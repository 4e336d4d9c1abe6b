"""Every script under ``tools/`` runs at a tiny size, so a benchmark or helper that breaks fails CI: each
benchmark's output must carry the rows and figures docs/benchmarks.md quotes from it; each data maker must
rebuild the shipped data byte for byte. Tools run elsewhere: ``gpu-check`` (tests/test_gpu_check.py),
``bench_plan.py`` (tests/test_plan.py, on the planned run), ``verify_indexed.py`` (test_tokenize.py),
``make_synth_ft_data.py`` (test_finetune_synthesizer.py), ``fetch-test-assets``, ``make-vllm-venv``,
``local-slurm``, ``check_demo.py``, ``demo_digests.py`` and ``ci-leftovers`` (``.ci/run`` and the Makefile)."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

XDIST_SPREAD = True  # each tool on any worker (tests/conftest.py): they share no fixture

NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def tool(*args: str, timeout: float = 600, cwd: Path | None = None) -> str:
    """Run ``tools/ARGS[0]`` (Python scripts with this interpreter); its output, after checking it exited 0."""
    script = REPO / "tools" / args[0]
    cmd = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*cmd, *args[1:]], capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return proc.stdout


def rows(out: str, *labels: str, figures: int = 1) -> None:
    """Each label starts a line of ``out`` (after indentation) followed by at least ``figures`` numbers."""
    for label in labels:
        line = re.search(rf"^\s*{re.escape(label)}(.*)$", out, re.M)
        assert line, f"no row {label!r} in:\n{out[-3000:]}"
        found = re.findall(NUMBER, line.group(1))
        assert len(found) >= figures, f"row {label!r} has {len(found)} figure(s), not {figures}: {line.group(0)}"


def test_bench_records(tmp_path: Path) -> None:
    out = tool("bench_records.py", "--mb", "1", "--repeat", "2", "--dir", str(tmp_path), "--breakdown")
    labels = ["json+zstd", "orjson+zstd", "raw zstd one-shot", "raw zstd stream"]
    labels += ["ours (flush/1000)", "ours (flush/1000, threads=0)", "ours (flush/1000, sync_s=0)", "ours (close only)"]
    for label in labels:  # MB/s, then write / raw, / peer, CPU / peer
        assert re.search(re.escape(label) + rf"\s+│\s+{NUMBER}(\s+│\s+{NUMBER}x){{3}}", out), label
    verdict = r"target \(ours' write within 1.0x of orjson\+zstd\): \w+ "
    assert re.search(verdict + rf"\({NUMBER}x best of 2; per repeat {NUMBER}, {NUMBER};", out)
    assert "target (ours within 1.2x of raw zstd, write and read)" in out


def test_bench_decontaminate() -> None:
    out = tool("bench_decontaminate.py", "--mb", "0.2", "--eval-docs", "200", "--repeat", "1")
    rows = {
        m.group(1): int(m.group(2).replace(",", ""))
        for m in re.finditer(r"^(ours|janitor)\s+.*x\s+([\d,]+)\s", out, re.M)
    }
    assert set(rows) == {"ours", "janitor"} and rows["ours"] == rows["janitor"] > 0, out  # the same hits
    assert "same hits: yes" in out and "target (ours >= 10 MB/s on one core and >= 5x the janitor)" in out


def test_bench_preflight() -> None:
    out = tool("bench_preflight.py", "--shards", "50", "--repeats", "1")
    rows(out, "input check (launch, always)", "disk estimate + room", "model folder", figures=2)
    rows(out, "preflight, all parts", "status of the stage (yardstick)", figures=2)


def test_bench_synth_overhead() -> None:
    out = tool("bench_synth_overhead.py", "--docs", "40", "--vocab", "2000", "--repeat", "1")
    rows(out, "(a) floor: encode_batch of the texts", "ours: the stage's Scheduler, parse, write", figures=3)
    rows(out, "(c) reference: prompts with chains, tokenized", figures=3)
    assert re.search(rf"target: ours at most 1.0x of \(c\): (met|MISSED) \({NUMBER}x\)", out)


def test_bench_tokenize(tmp_path: Path) -> None:
    args = ["--mb", "0.3", "--cores", "1", "--train-mb", "0.3", "--shards", "2", "--skip-datatrove"]
    out = tool("bench_tokenize.py", *args, "--dir", str(tmp_path))
    rows(out, "ipt_hpc tokenize", "limit (encode_batch_fast)", figures=6)
    assert "note: ipt_hpc's tokens equal the limit's" in out
    assert re.search(rf"target ipt_hpc >= 0.90x the limit: (met|MISSED) \(best of each {NUMBER}x\)", out)


def test_bench_synth_engine_transformers() -> None:
    args = ["--backend", "transformers", "--docs", "6", "--max-new-tokens", "8", "--repeats", "1", "--chunk-docs", "4"]
    out = tool("bench_synth_engine.py", *args)
    rows(out, "(a) limit: one generate call with every prompt", "(b) stage end to end (streaming)", figures=2)
    rows(out, "(c) chunked: 4 per blocking call, round by round", figures=2)


def test_bench_hf_train_gpu_tiny() -> None:
    out = tool("bench_hf_train_gpu.py", "--tiny", "--steps", "1")
    for attn, precision in (("sdpa", "bf16 weights"), ("eager", "fp32 weights + bf16 autocast")):
        assert re.search(rf"{attn}\s+{re.escape(precision)}\s+{NUMBER} tokens/s\s+{NUMBER}x", out), out


def test_bench_publish(tmp_path: Path) -> None:
    out = tool("bench_publish.py", "--gb", "0.002", "--shards", "2", "--repeat", "2", "--dir", str(tmp_path))
    assert "| run / part | shards | JSONL MB | Parquet MB | read MB/s | publish MB/s | publish/read | ms/shard |" in out
    assert re.search(rf"\| synthetic 0.002 GB augmented \| 2 \|( {NUMBER} \|){{6}}", out), out
    assert re.search(rf"publish/read per repeat {NUMBER}, {NUMBER}; same Parquet bytes in every repeat: yes", out)
    assert re.search(rf"target \(publish >= 0.8x the read on the synthetic run, best of 2\): \w+ \({NUMBER}x\)", out)


@pytest.mark.slurm
def test_bench_fanout_on_the_local_cluster() -> None:
    """The benchmark behind "10,000 shards submitted in 2 s" (held jobs, cancelled): it stopped running when
    stages began to refuse incomplete input (issue 28); its input is now a finished stage's folder."""
    out = tool("bench_fanout.py", "--shards", "300", "--naive-sample", "4", "--repeat", "1")
    rows(out, "submit: ours (job arrays)", "submit: one submitit job per shard", figures=3)
    rows(out, "status: ours (markers + 1 squeue)", "status: one squeue per shard", figures=2)
    assert "target: submit 300 in < 5 s with <= 1 sbatch calls: met" in out
    assert "target: status over 300 shards in < 1 s: met" in out
    jobs = subprocess.run(["squeue", "-h", "-n", "ipt-bench"], capture_output=True, text=True).stdout
    assert jobs.strip() == ""  # every held job cancelled


def test_make_demo_corpus_rebuilds_the_shipped_corpus(tmp_path: Path) -> None:
    tool("make_demo_corpus.py", str(tmp_path / "demo"))
    shipped = REPO / "data" / "demo"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(p.name for p in shipped.iterdir())
    assert (tmp_path / "demo" / "part-0000.jsonl").read_bytes() == (shipped / "part-0000.jsonl").read_bytes()
    made, ours = (gzip.decompress((d / "part-0001.jsonl.gz").read_bytes()) for d in (tmp_path / "demo", shipped))
    assert made == ours


def test_make_demo_eval_task_rebuilds_the_shipped_task(tmp_path: Path) -> None:
    out = tool("make_demo_eval_task.py", str(REPO / "data" / "demo"), str(tmp_path / "demo_mc.jsonl"))
    assert re.search(rf"{NUMBER} items, {NUMBER} modules", out)
    assert (tmp_path / "demo_mc.jsonl").read_bytes() == (REPO / "data" / "eval" / "demo_mc.jsonl").read_bytes()


def test_carry_wheels_downloads_what_a_bare_gpu_node_needs(tmp_path: Path) -> None:
    """PyPI only (allowed here and in CI): the 10 wheels of docs/doctor.md for CPython 3.12 x86_64."""
    out = tool("carry-wheels", str(tmp_path / "whl"), "3.12", timeout=300)
    names = sorted(p.name for p in (tmp_path / "whl").glob("*.whl"))
    assert len(names) == 10, names
    assert any(n.startswith("megatron_core-0.16.1-cp312") for n in names) and any("pydantic_core" in n for n in names)
    assert "megatron_core" in out


def test_ci_leftovers_finds_a_process_of_the_run() -> None:
    check = [str(REPO / "tools" / "ci-leftovers"), "--grace", "0.5", "--no-queue"]
    run_id = f"test-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "IPT_CI_RUN": run_id}
    sleeper = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)  # as an orphan would be
    try:
        found = subprocess.run(check, env=env, capture_output=True, text=True)
        assert found.returncode == 1 and f"process still running: {sleeper.pid} sleep 60" in found.stdout
    finally:
        sleeper.kill()
        sleeper.wait()
    clean = subprocess.run(check, env=env, capture_output=True, text=True)
    assert clean.returncode == 0 and "0 process(es)" in clean.stdout, clean.stdout
