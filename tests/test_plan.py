"""``plan``: the corpus sample and its count, the array layout arithmetic, a calibrated plan of a real
pipeline set beside what that pipeline then measured (report and status). The Slurm plans are in
test_plan_slurm.py (a module of its own, so that these CPU-bound tests do not wait in the Slurm tests' queue)."""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from conftest import REPO, make_docs, run_cli, write_jsonl

from ipt_hpc.atomic import read_json
from ipt_hpc.config import Config, ShardConfig
from ipt_hpc.errors import IptError
from ipt_hpc.planning.calibrate import waves
from ipt_hpc.planning.compare import output_bytes
from ipt_hpc.planning.estimate import layout
from ipt_hpc.planning.sample import sample_corpus


def corpus_sets(inp: Path, **more: object) -> list[str]:
    """``--set`` flags for a JSON Lines corpus made by ``make_docs`` and the config keys in ``more``."""
    sets = {
        "shard.inputs": f"[{inp}]",
        "shard.text_field": "content",
        **{k.replace("__", "."): v for k, v in more.items()},
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _corpus(folder: Path, n: int) -> list[dict]:
    docs = make_docs(n, seed=3, max_words=120)
    third = n // 3
    write_jsonl(folder / "a.jsonl", docs[:third])
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs[third : 2 * third])
    body = "".join(json.dumps(d) + "\n" for d in docs[2 * third :]).encode()
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    return docs


def test_sample_is_deterministic_and_counts_the_corpus(tmp_path: Path) -> None:
    docs = _corpus(tmp_path / "in", 900)
    cfg = ShardConfig(inputs=[str(tmp_path / "in")], text_field="content", keep_fields=["url"])
    first = sample_corpus(cfg, 30, tmp_path / "s1.jsonl")
    second = sample_corpus(cfg, 30, tmp_path / "s2.jsonl")
    assert (tmp_path / "s1.jsonl").read_bytes() == (tmp_path / "s2.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "s1.jsonl").read_text().splitlines()]
    assert len(rows) == 30 == first["sample_docs"] and set(rows[0]) == {"content", "url"}
    assert len({r["url"] for r in rows}) == 30  # spread over the files, no document twice
    assert {r["url"].split("/")[-1] for r in rows} - {d["url"].split("/")[-1] for d in docs} == set()
    assert first == second and first["docs"] == 900 and first["docs_exact"]
    assert first["text_bytes"] == pytest.approx(sum(len(d["content"].encode()) for d in docs), rel=1e-3)
    # a prefix of each file (plain, gzip and zstd alike) extrapolates to the whole by file bytes
    part = sample_corpus(cfg, 30, tmp_path / "s3.jsonl", prefix_bytes=8 << 10)
    assert not part["docs_exact"] and "extrapolated" in part["method"]
    assert part["docs"] == pytest.approx(900, rel=0.25)


def test_sample_names_what_it_cannot_read(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"other": 1}])
    with pytest.raises(IptError, match="no usable document"):
        sample_corpus(ShardConfig(inputs=[str(tmp_path / "in.jsonl")]), 5, tmp_path / "s.jsonl")


def test_layout_packs_shards_into_the_time_limit() -> None:
    cfg = Config.model_validate(
        {
            "execution": {"backend": "slurm", "parallelism": 100, "slurm": {"time_min": 60}},
            "plan": {"time_margin": 0.25},
        }
    )
    # 10,000 shards of 4 min with a 5 min model load: 45 min of room -> 10 shards a task
    lay = layout(cfg, 10_000, 240.0, 300.0, 1001)
    assert lay["shards_per_task"] == 10 and lay["tasks"] == 1_000 and lay["arrays"] == 1 and lay["fits"]
    assert lay["task_min"] == pytest.approx(5 + 40)
    assert "execution.shards_per_task=10" in lay["note"]
    # no load to amortise: one shard a task, arrays split at MaxArraySize
    lay = layout(cfg, 10_000, 240.0, 0.0, 1001)
    assert lay["shards_per_task"] == 1 and lay["arrays"] == math.ceil(10_000 / 1001) == lay["sbatch_calls"]
    # a shard longer than the room left: flagged, with the shard count that fits
    lay = layout(cfg, 100, 50 * 60.0, 0.0, 1001)
    assert not lay["fits"] and "raise shard.num_shards to at least 112" in lay["note"]


def test_waves_follow_rounds_and_batches() -> None:
    assert waves(50, 2, 16) == 4  # 25 a round: 16 + 9, twice
    assert waves(10, 2, 16) == 2
    assert waves(0, 2, 16) == 0
    assert waves(33, 1, 16) == 3


def small_pipeline(tmp: Path) -> list[str]:
    """``--set`` flags of a small real pipeline (synthesize to tokenize) with a tiny random model, made in ``tmp``."""
    from tiny_model import tiny_llama

    model = tiny_llama(tmp / "model")
    inp = write_jsonl(tmp / "in.jsonl", make_docs(60, seed=5, max_words=60))
    return corpus_sets(
        inp,
        shard__num_shards=4,
        synth__model=model,
        synth__max_new_tokens=8,
        synth__max_model_len=512,
        synth__convert_share=0.5,
        synth__batch_size=4,
        tokenize__tokenizer=model,
        tokenize__workers=1,
        execution__workers=2,
    )


def calibrate(run: Path, args: list[str]) -> None:
    proc = run_cli("plan", "--run", str(run), "--calibrate", "16", "--json", *args)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A calibrated plan of a small real pipeline (synthesize to tokenize), then that pipeline run."""
    tmp = tmp_path_factory.mktemp("plan")
    args = small_pipeline(tmp)
    run = tmp / "run"
    calibrate(run, args)
    proc = run_cli("pipeline", "--run", str(run), "--plan", "--yes", *args)
    assert proc.returncode == 0, proc.stderr
    return run, args


def test_calibrated_plan_covers_every_stage_with_its_sources(planned_run: tuple[Path, list[str]]) -> None:
    run, _ = planned_run
    plan = read_json(run / "plan.json")
    cal = read_json(run / "_state" / "plan" / "calibration.json")
    names = [s["stage"] for s in plan["stages"]]
    assert names == ["shard", "synthesize", "templify", "tokenize augmented", "tokenize raw"]
    assert plan["docs"] == 60 and cal["sample_docs"] == 16 and cal["concurrency"] == 2
    synth = next(s for s in plan["stages"] if s["stage"] == "synthesize")
    fig = cal["stages"]["synthesize"]
    assert fig["engine_batch"] == 4 and fig["waves"] > 0 and fig["load_s"] > 0 and fig["gen_tokens_per_s"] > 0
    # the figures scale the calibration: generated tokens per synthesized document times the documents the
    # by-id choice converts (synth.convert_share of the corpus)
    assert synth["work"]["output_tokens"] == round(60 * 0.5 * fig["gen_tokens_mean"])
    assert synth["output_bytes"] == pytest.approx(60 * fig["bytes_per_doc"] + fig["fixed_bytes"])
    assert all("16 sample documents" in s["source"] for s in plan["stages"])
    assert plan["total"]["wall_s"] == pytest.approx(sum(s["wall_s"] for s in plan["stages"]))
    assert synth["gpu_hours"] == 0 and synth["cpu_hours"] > 0  # the CPU engine


def test_bench_plan_sets_plan_beside_actual(planned_run: tuple[Path, list[str]]) -> None:
    """tools/bench_plan.py on the planned run (``--skip-run``): the table docs/benchmarks.md quotes."""
    run, _ = planned_run
    cmd = [sys.executable, str(REPO / "tools" / "bench_plan.py"), "--run", str(run), "--skip-run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"stage\s+plan wall\s+actual\s+ratio\s+plan size\s+actual\s+ratio", out), out
    for stage in ("shard", "synthesize", "templify", "tokenize augmented", "tokenize raw"):
        assert re.search(rf"^{stage}\s+\S+.*\s[0-9]+\.[0-9]{{2}}$", out, re.M), (stage, out)
    assert re.search(r"data stages within ±35%: [0-9]+/[0-9]+ figures", out)


def test_report_and_status_set_the_plan_beside_the_run(planned_run: tuple[Path, list[str]]) -> None:
    run, _ = planned_run
    plan = read_json(run / "plan.json")
    walls = {}
    for line in (run / "_state" / "steps.jsonl").read_text().splitlines():
        entry = json.loads(line)
        walls[entry["step"]] = entry["finished"] - entry["started"]
    text = (run / "report" / "report.md").read_text()
    assert "## Plan vs actual" in text
    table = text.split("## Plan vs actual")[1].split("\n## ")[0]
    body = [row for row in table.splitlines() if row.startswith("| ")][1:]  # the header row left out
    lines = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in body}
    folders = {
        "shard": "raw",
        "synthesize": "synth",
        "templify": "augmented",
        "tokenize augmented": "tokens/augmented",
        "tokenize raw": "tokens/raw",
    }
    for stage in plan["stages"]:
        cells = lines[stage["stage"]]
        wall_ratio = walls[stage["stage"]] / stage["wall_s"]
        size_ratio = output_bytes(run, run / folders[stage["stage"]]) / stage["output_bytes"]
        assert float(cells[2]) == pytest.approx(wall_ratio, abs=0.006), stage["stage"]
        assert float(cells[5]) == pytest.approx(size_ratio, abs=0.006), stage["stage"]
    proc = run_cli("status", "--run", str(run), "--json", "--no-queue")
    assert proc.returncode == 0, proc.stderr
    rows = {r["stage"]: r for r in json.loads(proc.stdout)["plan"]}
    assert rows["synthesize"]["shards_done"] == rows["synthesize"]["shards"] == 4
    assert rows["templify"]["actual_wall_s"] == pytest.approx(walls["templify"])


def test_pipeline_plan_asks_before_submitting(planned_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    run, args = planned_run
    other = tmp_path / "run"
    (other / "_state" / "plan").mkdir(parents=True)
    calibration = run / "_state" / "plan" / "calibration.json"
    (other / "_state" / "plan" / "calibration.json").write_bytes(calibration.read_bytes())
    proc = run_cli("pipeline", "--run", str(other), "--plan", *args)
    assert proc.returncode == 2 and "--yes" in proc.stderr
    assert (other / "plan.json").exists() and not (other / "raw").exists()  # planned, nothing ran
    proc = run_cli("plan", "--run", str(tmp_path / "fresh"), *args)
    assert proc.returncode == 2 and "plan --calibrate N first" in proc.stderr


def test_doctor_report_gives_training_throughput(tmp_path: Path) -> None:
    from ipt_hpc.model.train.model import flops_per_token
    from ipt_hpc.planning.estimate import doctor_throughput

    cfg = Config.model_validate({"train": {"nodes": 2, "ranks_per_node": 4, "model": {"num_layers": 4}}})
    report = {"host": "gpu01", "checks": {"train": {"ok": True, "mfu": 0.082, "ranks": 1, "tokens_per_s": 32380.0}}}
    (tmp_path / "doctor.json").write_text(json.dumps(report))
    got = doctor_throughput(cfg, tmp_path / "doctor.json")
    want = 0.082 * cfg.train.peak_flops * 8 / flops_per_token(cfg.train)
    assert got["tokens_per_s"] == pytest.approx(want) and "MFU 8.2%" in got["source"] and "8 rank(s)" in got["source"]
    report["checks"]["train"]["mfu"] = None  # a CPU doctor report measures no MFU
    (tmp_path / "doctor.json").write_text(json.dumps(report))
    with pytest.raises(IptError, match="no Megatron-Core training figure"):
        doctor_throughput(cfg, tmp_path / "doctor.json")


@pytest.mark.train
def test_calibration_trains_exports_and_evaluates_the_configured_model(tmp_path: Path) -> None:
    """With a train section the calibration trains the configured model briefly, exports and evaluates it;
    the plan's train, export and eval rows scale those figures."""
    run = tmp_path / "run"
    sets = [
        "--set",
        "plan.calibrate_train_iters=4",
        "--set",
        "synth.max_new_tokens=16",
        "--set",
        "train.train_iters=200",
    ]
    proc = run_cli("plan", "--config", "configs/demo.yaml", "--run", str(run), "--calibrate", "8", "--json", *sets)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    fig = read_json(run / "_state" / "plan" / "calibration.json")["model"]
    assert fig["iterations"] == 4 and fig["tokens_per_s"] > 0 and fig["checkpoint_bytes"] > 0 and fig["hf_bytes"] > 0
    rows = {s["stage"]: s for s in plan["stages"]}
    assert list(rows)[-3:] == ["train", "export", "eval"]
    tokens = 200 * 16 * 128  # train_iters x global_batch_size x seq_length of configs/demo.yaml
    assert rows["train"]["work"]["train_tokens"] == tokens
    assert rows["train"]["wall_s"] == pytest.approx(fig["train_overhead_s"] + tokens / fig["tokens_per_s"])
    assert rows["train"]["cpu_hours"] == pytest.approx(rows["train"]["wall_s"] / 3600)  # one CPU rank
    assert rows["train"]["output_bytes"] == 2 * fig["checkpoint_bytes"]  # save_interval 100: two kept
    assert rows["export"]["output_bytes"] == fig["hf_bytes"] and rows["eval"]["wall_s"] == fig["eval_s"]
