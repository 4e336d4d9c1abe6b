"""vLLM for real: ``VllmEngine`` and ``synthesize --backend vllm`` on the shipped tiny synthesizer.

Runs in the venv that ``tools/make-vllm-venv`` builds (vLLM's CPU build, ``make test-vllm``; part of
``make test``); skipped where vLLM is not importable unless IPT_REQUIRE_VLLM=1 (CI), where that fails.
One engine serves the in-process tests (the stage's per-process engine cache); the SIGKILL test starts
its own processes.
"""

from __future__ import annotations

import os
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
    return synthesize._engine(job)


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """vLLM's OpenAI server (the module: the CPU build's ``vllm serve`` script fails on its distribution name)
    on the tiny synthesizer, on a free loopback port; stopped with TERM, then KILL."""
    import urllib.request

    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "vllm-server.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL), "--port", str(port),
           "--host", "127.0.0.1", "--max-model-len", "1024", "--enforce-eager", "--generation-config", "vllm",
           "--dtype", "float32", "--gpu-memory-utilization", "0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("vLLM's server did not answer /health in 400 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def test_the_same_shard_through_the_server_gives_the_in_process_bytes(tmp_path: Path, vllm_server: str) -> None:
    """synth.backend=server against vLLM's real OpenAI server, and the in-process vLLM engine, on the same shard:
    the same generated ids, so the same records byte for byte."""
    here = make_run(tmp_path / "in-process", docs=12)
    run_stage(synthesize.STAGE, config(**{"synth.max_model_len": 1024}), here)
    served = make_run(tmp_path / "served", docs=12)
    sets = {"synth.backend": "server", "synth.server_url": vllm_server, "synth.max_model_len": 1024}
    run_stage(synthesize.STAGE, config(**sets), served)
    name = shard_name(0, 1)
    ours = list(read_records(served / "synth" / name))
    assert ours == list(read_records(here / "synth" / name)) and len(ours) == 12
    assert (served / "synth" / name).read_bytes() == (here / "synth" / name).read_bytes()
