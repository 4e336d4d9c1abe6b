"""vLLM for real: ``VllmEngine`` and ``synthesize --backend vllm`` on the shipped tiny synthesizer.

Runs in the venv that ``tools/make-vllm-venv`` builds (vLLM's CPU build, ``make test-vllm``; part of
``make test``); skipped where vLLM is not importable unless IPT_REQUIRE_VLLM=1 (CI), where that fails.
One engine serves the in-process tests (the stage's per-process engine cache); the SIGKILL test starts
its own processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_docs, shard_corpus, write_jsonl

from ipt_hpc.config import load_config
from ipt_hpc.execution import StageState, build, run_stage, shard_name
from ipt_hpc.records import partial_path, read_records
from ipt_hpc.stages import synthesize

if os.environ.get("IPT_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm
MODEL = REPO / "models" / "tiny-synthesizer"  # 1,024 positions, EOS id 1
SETS = {
    "synth.model": str(MODEL),
    "synth.backend": "vllm",
    "synth.dtype": "float32",
    "synth.max_new_tokens": 128,
    # a budget beyond the model's 1,024 positions: a prompt longer than the model is vLLM's to reject
    "synth.max_model_len": 2048,
    "synth.rounds": 2,
    "synth.chunk_docs": 4,
    "synth.gpu_memory_utilization": 0.1,  # the CPU build reserves this share of RAM for its KV cache
    "synth.vllm_args": {"enforce_eager": True},  # no torch.compile warm-up: minutes saved on 2 cores
    "execution.backend": "debug",
}


def config(**sets: object):
    return load_config(None, None, {**SETS, **sets})


def make_run(run: Path, docs: int = 16, long_doc: int | None = None) -> Path:
    """RUN/raw with one shard; ``long_doc``: that document gets ~1,500 words (over the model's positions)."""
    items = make_docs(docs, seed=5, min_words=5, max_words=30)
    if long_doc is not None:
        items[long_doc]["content"] = " ".join(["instruction corpus token"] * 500)
    inp = write_jsonl(run / "in.jsonl", items)
    sets = {"shard.inputs": [str(inp)], "shard.text_field": "content", "shard.num_shards": 1}
    shard_corpus(load_config(None, None, {**sets, "execution.backend": "debug"}), run / "raw")
    return run


@pytest.fixture(scope="module")
def engine():
    """The engine the stage itself will use in this process (same options: the stage's cache reuses it)."""
    job = build(synthesize.STAGE, config(), "unused", num_shards=1).stage_config
    return synthesize._engine(job, Path("unused"))


def spy(engine, calls: list[list[int]]):
    """Record the prompt ids vLLM itself reports for every request it completed (the stage streams its
    requests through vLLM's engine; ``generate`` goes through the same ``step``)."""
    llm_engine = engine.llm.llm_engine
    real = llm_engine.step

    def step(*args, **kwargs):
        results = real(*args, **kwargs)
        calls.extend(list(r.prompt_token_ids) for r in results if r.finished)
        return results

    llm_engine.step = step
    return real


def test_engine_strips_eos_and_isolates_a_rejected_prompt(engine) -> None:
    tok = engine.tokenizer
    good = [
        [tok.bos_token_id, *tok(f" <CON> {t} </CON>\n\n", add_special_tokens=False)["input_ids"]]
        for t in ("The cat sat on the mat.", "Slurm runs array jobs on a cluster.")
    ]
    bad = [tok.bos_token_id, 999_999]  # out of the vocabulary: vLLM raises VLLMValidationError
    gens = engine.generate([good[0], bad, good[1]], 160)
    assert [g.error is None for g in gens] == [True, False, True]
    assert "out of vocabulary" in gens[1].error
    for g in (gens[0], gens[2]):
        assert g.ids and engine.eos not in g.ids
    assert any(len(g.ids) < 160 for g in (gens[0], gens[2])), "no generation stopped at EOS: the check proves nothing"


def expected_prompt(rec: dict, recs: list[dict], contexts: list[str], tok) -> list[int]:
    """The prompt as the reference writes it (earlier entries as BOS, context, parsed pairs, EOS; then BOS
    and the context), tokenized as one string: the stage must send vLLM exactly these ids."""
    chain = "".join(
        f"{tok.bos_token} <CON> {contexts[j]} </CON>\n\n"
        + "\n\n".join(f"<QUE> {p['Q']} <ANS> {p['A']} </END>" for p in recs[j]["pairs"])
        + tok.eos_token
        for j in rec["chain_docs"]
    )
    return tok(f"{chain}{tok.bos_token} <CON> {contexts[rec['_index']]} </CON>\n\n", add_special_tokens=False)[
        "input_ids"
    ]


def test_stage_prompts_chains_and_rejection(tmp_path: Path, engine) -> None:
    cfg = config()
    run = make_run(tmp_path / "run", docs=16, long_doc=2)
    calls: list[list[int]] = []
    real = spy(engine, calls)
    try:
        run_stage(synthesize.STAGE, cfg, run)
    finally:
        engine.llm.llm_engine.step = real
    recs = list(read_records(run / "synth" / shard_name(0, 1)))
    assert len(recs) == 16
    # the long document: vLLM rejected it, and only it; the rest of the shard completed
    assert "engine rejected the prompt" in recs[2]["error"] and recs[2]["pairs"] == []
    assert [r["error"] for i, r in enumerate(recs) if i != 2] == [None] * 15
    # stored generations never end with EOS (vLLM keeps it in token_ids)
    eos = engine.eos
    assert all(eos not in r["gen_ids"] for r in recs)
    assert sum(r["gen_tokens"] < 128 for r in recs) >= 4, "too few generations stopped at EOS to test"
    # the ids vLLM received are the reference prompt string tokenized whole: BOS, context, parsed pairs, EOS
    # per earlier entry, then BOS and the context
    job = build(synthesize.STAGE, cfg, run).stage_config
    tok = engine.tokenizer
    _, contexts, _ = synthesize.context_ids(
        synthesize.PieceTokenizer(tok), [r["text"] for r in recs], synthesize.context_room(job)
    )
    by_index = {i: {**r, "_index": i} for i, r in enumerate(recs)}
    chained = 0
    for i, rec in by_index.items():
        if rec["error"]:
            continue
        want = expected_prompt(rec, recs, contexts, tok)
        assert want in calls, f"record {i}: vLLM never received the prompt the stage built"
        assert want.count(eos) == len(rec["chain_docs"])
        assert rec["prompt_tokens"] == len(want)
        chained += bool(rec["chain_docs"])
    assert chained >= 3, "round 2 chained too few prompts to test the chain"


def test_sigkilled_vllm_synthesis_resumes_to_identical_bytes(tmp_path: Path, engine) -> None:
    from ipt_hpc.execution.submit import prepare

    cfg = config(**{"synth.chunk_docs": 2})
    ref = make_run(tmp_path / "ref", docs=120)  # long enough to be killed mid-shard (streaming is fast)
    run_stage(synthesize.STAGE, cfg, ref)
    name = shard_name(0, 1)
    want = (ref / "synth" / name).read_bytes()
    seq = make_run(tmp_path / "seq", docs=120)  # one document at a time: what streaming must reproduce
    run_stage(synthesize.STAGE, config(**{"synth.chunk_docs": 2, "synth.max_in_flight": 1}), seq)
    assert (seq / "synth" / name).read_bytes() == want
    assert sum(bool(r["chain"]) for r in read_records(ref / "synth" / name)) >= 5, "too few chains to test"

    run = make_run(tmp_path / "run", docs=120)
    prepare(build(synthesize.STAGE, cfg, run))
    cmd = [sys.executable, "-m", "ipt_hpc.launch", "run-shard", "--stage-dir", str(run / "synth")]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = StageState(run / "synth")
    deadline = time.time() + 600
    partial = partial_path(run / "synth" / name)
    while time.time() < deadline and (state.read("running", name) or {}).get("records", 0) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        if partial.exists() and partial.stat().st_size > 0:  # a first flush: records are durable
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the task finished before it could be killed; make the shard longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    proc.stderr.close()
    assert not (run / "synth" / name).exists() and partial_path(run / "synth" / name).exists()
    # the rerun is another process too (this one's engine would make it a different path)
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (run / "synth" / name).read_bytes() == want
    resumed = next(e for e in state.events(name) if e["event"] == "resumed")
    assert 2 <= resumed["records"] < 120


SERVED = {"synth.backend": "server", "synth.max_model_len": 1024}  # the server's context: the model's positions


SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1"]


def slurm_up() -> bool:
    """A local Slurm cluster answers (required under IPT_REQUIRE_SLURM=1, as in CI)."""
    if os.environ.get("IPT_REQUIRE_SLURM") == "1":
        return True
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and any(s in ("idle", "mix", "alloc") for s in proc.stdout.split())


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """vLLM's OpenAI server (CPU build) on the tiny synthesizer. With a Slurm cluster (CI): the shared-server job
    users submit, ``sbatch slurm/synth-server.sbatch URL_FILE MODEL 1024 ...``, and its URL once written; without:
    started as launch mode starts it (:class:`LaunchedServer`, the stage's own command for these settings)."""
    from ipt_hpc.execution.backends import queue_states
    from ipt_hpc.stages.synth_launch import LaunchedServer, free_port

    folder = tmp_path_factory.mktemp("server")
    t0 = time.time()
    if not slurm_up():
        job = build(synthesize.STAGE, config(**SERVED, **{"synth.server.launch": True}), "unused", num_shards=1)
        server = LaunchedServer(synthesize.launch_command(job.stage_config), folder)
        try:
            server.start(str(MODEL), 600)
            print(f"vLLM's server answered /health and listed the model after {time.time() - t0:.1f} s")
            yield server.url
        finally:
            server.stop()
        return
    url_file = folder / "synth-server.url"
    # VLLM_SERVER_DEV_MODE: /reset_prefix_cache, which tools/bench_synth_engine.py calls between its passes
    env = {**os.environ, "IPT_PYTHON": sys.executable, "IPT_SERVER_PORT": str(free_port()), "VLLM_SERVER_DEV_MODE": "1"}
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=4G", "--time=30",
           f"--output={folder}/server-%j.out", str(REPO / "slurm" / "synth-server.sbatch"), str(url_file),
           str(MODEL), "1024", *SERVER_FLAGS]  # fmt: skip
    job_id = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        while not url_file.exists():
            log = next(folder.glob("server-*.out"), None)
            tail = log.read_text()[-3000:] if log else "(no log yet)"
            assert time.time() - t0 < 600, f"no URL from the server job {job_id} in 600 s:\n{tail}"
            assert queue_states([job_id]), f"the server job {job_id} ended:\n{tail}"
            time.sleep(1)
        print(f"the server job wrote its URL {time.time() - t0:.1f} s after sbatch")
        yield url_file.read_text().strip()
    finally:
        subprocess.run(["scancel", job_id], check=False)
        deadline = time.time() + 120
        while queue_states([job_id]) and time.time() < deadline:
            time.sleep(1)
        assert not url_file.exists(), "the server job did not clean up its URL file"


def test_the_same_shard_through_the_server_gives_the_in_process_bytes(tmp_path: Path, vllm_server: str) -> None:
    """synth.backend=server against vLLM's real OpenAI server, and the in-process vLLM engine, on the same shard:
    the same generated ids, so the same records byte for byte."""
    here = make_run(tmp_path / "in-process", docs=12)
    run_stage(synthesize.STAGE, config(**{"synth.max_model_len": 1024}), here)
    served = make_run(tmp_path / "served", docs=12)
    run_stage(synthesize.STAGE, config(**SERVED, **{"synth.server.url": vllm_server}), served)
    name = shard_name(0, 1)
    ours = list(read_records(served / "synth" / name))
    assert ours == list(read_records(here / "synth" / name)) and len(ours) == 12
    assert (served / "synth" / name).read_bytes() == (here / "synth" / name).read_bytes()
    assert {r["finish_reason"] for r in ours} <= {"stop", "length"}


def test_a_prompt_over_the_servers_context_is_that_records_error(vllm_server: str) -> None:
    """The server's 400 for a prompt over its context is that prompt's error; the others are answered. (A run
    cannot send one: the check before the first request refuses a budget over the server's context; this
    client skips the check.)"""
    from transformers import AutoTokenizer

    from ipt_hpc.stages.synth_server import ServerEngine

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    short = [tok.bos_token_id, *tok(" <CON> A short document. </CON>\n\n", add_special_tokens=False)["input_ids"]]
    long = short + [5] * 1500
    e = ServerEngine(vllm_server, str(MODEL), max_model_len=4096, eos=tok.eos_token_id)
    try:
        out = e.generate([short, long, short], 16)
    finally:
        e.close()
    assert out[1].error and out[1].error.startswith("server rejected the prompt (400)"), out[1]
    assert out[0].error is None and out[0] == out[2] and out[0].finish_reason in ("stop", "length")


@pytest.mark.slurm
def test_launch_mode_on_slurm_a_killed_server_fails_the_shard_and_the_rerun_resumes(
    tmp_path: Path, vllm_server: str
) -> None:
    """synth.server.launch in a Slurm array task: the task starts vLLM's server; SIGKILL to the server mid-shard
    fails the shard with one line; the rerun (a new task, a new server) resumes after the durable records to
    the bytes of the same shard through the shared server (the fixture's job), by a client array task."""
    from test_local_slurm import slurm_cluster  # noqa: F401 - skip/fail without a cluster

    from ipt_hpc.execution.backends import queue_states

    def wait_idle(job_ids: list[str], timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and queue_states(job_ids):
            time.sleep(1)
        assert not queue_states(job_ids), f"Slurm job {job_ids} still queued after {timeout} s"

    docs = 40
    on_slurm = {"execution.backend": "slurm", "execution.slurm.time_min": 20}
    ref = make_run(tmp_path / "ref", docs=docs)  # a client array task of the shared server (the fixture's job)
    wait_idle(
        run_stage(synthesize.STAGE, config(**SERVED, **on_slurm, **{"synth.server.url": vllm_server}), ref)["job_ids"],
        600,
    )
    name = shard_name(0, 1)
    want = (ref / "synth" / name).read_bytes()

    sets = {**SERVED, **on_slurm, "synth.server.launch": True, "synth.chunk_docs": 2, "synth.max_in_flight": 1}
    run = make_run(tmp_path / "run", docs=docs)
    state = StageState(run / "synth")

    first = run_stage(synthesize.STAGE, config(**sets), run)
    part = partial_path(run / "synth" / name)
    deadline = time.time() + 600
    while time.time() < deadline and not (part.exists() and part.stat().st_size):  # records durable
        assert queue_states(first["job_ids"]), "the task ended before its first durable records"
        time.sleep(0.05)
    (log,) = (run / "synth" / "_state" / "logs" / "shards").glob("server-*.log")
    pid = int(next(line for line in log.read_text().splitlines() if line.startswith("# server pid")).split()[-1])
    os.kill(pid, signal.SIGKILL)  # the task runs on this host's node (the default partition)
    wait_idle(first["job_ids"], 120)
    error = state.read("failed", name)["error"]
    assert "the launched server exited with code -9" in error and "\n" not in error.strip(), error

    second = run_stage(synthesize.STAGE, config(**sets), run, "failed")
    wait_idle(second["job_ids"], 600)
    assert (run / "synth" / name).read_bytes() == want
    resumed = next(e for e in state.events(name) if e["event"] == "resumed")
    assert 2 <= resumed["records"] < docs
    assert len(list(log.parent.glob("server-*.log"))) == 2  # each task its own server, its own log


def test_bench_synth_engine_server_path(vllm_server: str) -> None:
    """tools/bench_synth_engine.py's server row, at a tiny size on the running server (CI keeps it working)."""
    args = ["--backend", "vllm", "--docs", "6", "--max-new-tokens", "8", "--repeats", "1", "--chunk-docs", "4",
            "--server-url", vllm_server, "--set", "synth.gpu_memory_utilization=0.1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "tools/bench_synth_engine.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"\(d\) stage through vLLM's OpenAI server\s+[\d,]+\s+[\d.]+", out), out
    assert re.search(r"server path / in-process stage: [\d.]+x", out), out
    assert "differ" not in out and "did not empty" not in out, out
