"""synthesize with a tiny random Llama on CPU: token-exact prompts, records, resume, rejected prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fanout import make_raw
from tiny_model import tiny_llama

from ipt_hpc.config import load_config
from ipt_hpc.execution import StageState, build, run_stage, shard_name
from ipt_hpc.records import RecordWriter, partial_path, read_records
from ipt_hpc.stages import synthesize

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("synth"))


def cfg_for(model: Path, **sets):
    base = {
        "synth.model": str(model),
        "synth.max_new_tokens": 12,
        "synth.max_model_len": 512,
        "synth.rounds": 2,
        "synth.chunk_docs": 3,
        "execution.backend": "debug",
    }
    return load_config(None, None, {**base, **{f"synth.{k}" if "." not in k else k: v for k, v in sets.items()}})


def test_prompts_are_token_exact_and_records_complete(tmp_path: Path, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    run = make_raw(tmp_path / "run", 2, docs=10)
    run_stage(synthesize.STAGE, cfg_for(model_dir), run)
    for k in range(2):
        name = shard_name(k, 2)
        recs = list(read_records(run / "synth" / name))
        src = list(read_records(run / "raw" / name))
        assert [r["id"] for r in recs] == [s["id"] for s in src]
        for rec in recs:
            # no pairs from a random model: every prompt is a fresh chain, the prompt string tokenized whole
            prompt = tok(f"<s> <CON> {rec['text']} </CON>\n\n", add_special_tokens=False)["input_ids"]
            assert rec["prompt_tokens"] == len(prompt) and prompt[0] == tok.bos_token_id
            assert rec["pairs"] == [] and rec["chain"] == []
            assert 0 < rec["gen_tokens"] <= 12 and rec["error"] is None
        assert {r["round"] for r in recs} == {0, 1}
    done = StageState(run / "synth").read("done", shard_name(0, 2))
    assert done["docs"] == len(list(read_records(run / "raw" / shard_name(0, 2))))
    assert done["pairs_per_doc"] == {"0": done["docs"]}
    assert 0 <= done["cpu_side_share"] <= 1
    manifest = __import__("ipt_hpc.atomic", fromlist=["read_json"]).read_json(run / "synth" / "manifest.json")
    assert manifest["totals"]["docs"] == 10 and manifest["totals"]["pairs"] == 0
    assert len(manifest["shards"]) == 2


def test_rejected_and_too_long_prompts_become_record_errors(tmp_path: Path, model_dir: Path) -> None:
    run = make_raw(tmp_path / "run", 1, docs=6)
    # max_model_len larger than the model's 512 positions: long prompts are rejected by the engine
    long_doc = {"id": "x:1", "text": "word " * 700}
    recs = list(read_records(run / "raw" / shard_name(0, 1)))
    (run / "raw" / shard_name(0, 1)).unlink()
    with RecordWriter(run / "raw" / shard_name(0, 1)) as w:
        w.write_many([*recs[:2], long_doc, *recs[2:]])
    run_stage(synthesize.STAGE, cfg_for(model_dir, max_model_len=4096, max_new_tokens=12), run)
    out = list(read_records(run / "synth" / shard_name(0, 1)))
    bad = next(r for r in out if r["id"] == "x:1")
    assert bad["error"] and "exceeds" in bad["error"] and bad["pairs"] == []
    assert all(r["error"] is None for r in out if r["id"] != "x:1")
    # skip policy: a document over the budget is not sent at all, and counted
    run_stage(synthesize.STAGE, cfg_for(model_dir, max_model_len=300, too_long="skip"), run, force=True)
    done = StageState(run / "synth").read("done", shard_name(0, 1))
    assert done["over_budget"] == 1 and done["errors"] == 1


def test_interrupted_synthesis_resumes_to_identical_bytes(tmp_path: Path, model_dir: Path) -> None:
    ref = make_raw(tmp_path / "ref", 1, docs=14)
    run_stage(synthesize.STAGE, cfg_for(model_dir), ref)
    want = (ref / "synth" / shard_name(0, 1)).read_bytes()
    run = make_raw(tmp_path / "run", 1, docs=14)
    # an attempt that died after 2 durable chunks: keep those records in a .partial
    durable = list(read_records(ref / "synth" / shard_name(0, 1)))[:6]
    out = run / "synth" / shard_name(0, 1)
    stage = build(synthesize.STAGE, cfg_for(model_dir), run)
    from ipt_hpc.execution.submit import prepare

    prepare(stage)
    w = RecordWriter(out)
    w.write_many(durable)
    w.flush()
    w.abandon()
    assert partial_path(out).exists()
    run_stage(synthesize.STAGE, cfg_for(model_dir), run)
    assert out.read_bytes() == want
    events = [e["event"] for e in StageState(run / "synth").events(shard_name(0, 1))]
    assert "resumed" in events


# long enough that the killed task is still running when its progress marker (rewritten at most once a second)
# first shows 6 records: with one OpenMP thread per process, 200 documents took ~1.5 s and often finished between
# two rewrites
KILL_DOCS = 600


def test_sigkilled_synthesis_resumes_to_identical_bytes(tmp_path: Path, model_dir: Path) -> None:
    from conftest import sigkill_shard_task

    from ipt_hpc.execution.submit import prepare

    cfg = cfg_for(model_dir, max_new_tokens=24, chunk_docs=2)
    ref = make_raw(tmp_path / "ref", 1, docs=KILL_DOCS)
    run_stage(synthesize.STAGE, cfg, ref)
    want = (ref / "synth" / shard_name(0, 1)).read_bytes()
    seq = make_raw(tmp_path / "seq", 1, docs=KILL_DOCS)
    run_stage(synthesize.STAGE, cfg_for(model_dir, max_new_tokens=24, chunk_docs=2, max_in_flight=1), seq)
    assert (seq / "synth" / shard_name(0, 1)).read_bytes() == want  # streamed == one document at a time
    run = make_raw(tmp_path / "run", 1, docs=KILL_DOCS)
    prepare(build(synthesize.STAGE, cfg, run))
    name = shard_name(0, 1)
    sigkill_shard_task(run / "synth", name, 6)
    state = StageState(run / "synth")
    assert not (run / "synth" / name).exists() and partial_path(run / "synth" / name).exists()
    run_stage(synthesize.STAGE, cfg, run, "failed")
    assert (run / "synth" / name).read_bytes() == want
    resumed = next(e for e in state.events(name) if e["event"] == "resumed")
    assert 6 <= resumed["records"] < KILL_DOCS


def test_cli_synthesize_dry_run_then_run(tmp_path: Path, model_dir: Path) -> None:
    from conftest import run_cli

    run = make_raw(tmp_path / "run", 2, docs=6)
    common = ["--run", str(run), "--model", str(model_dir), "--set", "synth.max_new_tokens=8", "--executor", "debug"]
    proc = run_cli("synthesize", *common, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "synthesize 2 shards" in proc.stderr
    assert (run / "synth" / "_state" / "stage-run.json").exists()
    assert not list((run / "synth").glob("shard-*"))
    proc = run_cli("synthesize", *common, "--shards", "1")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (run / "synth").glob("shard-*")] == [shard_name(1, 2)]


def test_convert_share_sends_only_chosen_documents(tmp_path: Path, model_dir: Path) -> None:
    from ipt_hpc.stages.mixture import converted

    run = make_raw(tmp_path / "run", 1, docs=30)
    run_stage(synthesize.STAGE, cfg_for(model_dir, convert_share=0.5, max_new_tokens=4), run)
    src = [r["id"] for r in read_records(run / "raw" / shard_name(0, 1))]
    got = [r["id"] for r in read_records(run / "synth" / shard_name(0, 1))]
    assert got == [i for i in src if converted(i, 0.5)] and 0 < len(got) < len(src)
    assert StageState(run / "synth").read("done", shard_name(0, 1))["not_converted"] == len(src) - len(got)


def test_background_context_ids_equal_one_eager_call(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    job = synthesize.synth_job(cfg_for(model_dir, max_model_len=40, max_new_tokens=8), None)
    texts = [("word " * n).strip() for n in range(1, 60)]
    room = synthesize.context_room(job)
    eager, used, cut = synthesize.context_ids(synthesize.PieceTokenizer(tok), texts, room)
    lazy = synthesize.ContextIds(tok, texts, job, block=7)
    try:
        assert [lazy[d] for d in range(len(texts))] == eager
        assert [lazy.context(d) for d in range(len(texts))] == used
        assert lazy.over_budget() == cut > 0
    finally:
        lazy.close()


def test_repetition_guard_bans_only_repeats_of_the_answer() -> None:
    import torch

    from ipt_hpc.stages.synth_engines import AnswerNoRepeatNGram

    # prompt 7 8 9 7 8 (not looked at), answer 1 2 3 1 2: with n=3, token 3 would repeat "1 2 3"
    ids = torch.tensor([[7, 8, 9, 7, 8, 1, 2, 3, 1, 2]])
    scores = torch.zeros(1, 10)
    out = AnswerNoRepeatNGram(3, start=5)(ids, scores.clone())
    assert out[0, 3] == float("-inf") and torch.isfinite(out[0, [0, 1, 2, 4, 9]]).all()
    # the same ids seen as all prompt: nothing banned (copying from the context stays allowed)
    assert torch.isfinite(AnswerNoRepeatNGram(3, start=10)(ids, scores.clone())).all()


def test_repetition_guard_reaches_generate(tmp_path: Path, model_dir: Path) -> None:
    from ipt_hpc.errors import IptError

    run = make_raw(tmp_path / "run", 1, docs=4)
    with pytest.raises(IptError, match="no_repeat_ngram_size"):  # not a vLLM option
        build(synthesize.STAGE, cfg_for(model_dir, backend="vllm", no_repeat_ngram_size=4), run)
    run_stage(synthesize.STAGE, cfg_for(model_dir, max_new_tokens=24, no_repeat_ngram_size=2, keep_raw=True), run)
    for rec in read_records(run / "synth" / shard_name(0, 1)):
        grams = list(zip(rec["gen_ids"], rec["gen_ids"][1:], strict=False))
        assert len(grams) == len(set(grams))  # no bigram of the answer repeats


def test_vllm_tensor_parallel_needs_as_many_visible_gpus() -> None:
    from ipt_hpc.errors import IptError
    from ipt_hpc.stages.synth_engines import _check_gpus

    _check_gpus(1)  # one GPU (or the CPU build) is vLLM's own business
    with pytest.raises(IptError, match=r"tensor_parallel_size=4 needs as many GPUs per task, this task sees 0"):
        _check_gpus(4)


def test_streaming_equals_the_sequential_loop_with_chains(tmp_path: Path) -> None:
    """The shipped tiny synthesizer writes pairs, so later rounds chain onto earlier ones: the scheduler
    must build each chained prompt after its predecessor's generation, whatever order results come in."""
    from conftest import REPO

    model = REPO / "models" / "tiny-synthesizer"
    sets = {"max_new_tokens": 96, "max_model_len": 1024, "rounds": 3, "chunk_docs": 5, "batch_size": 4}
    outs = {}
    for window in (1, 7, None):  # one document at a time; a small window; the engine's own bound (16)
        run = make_raw(tmp_path / f"w{window}", 1, docs=36)
        run_stage(synthesize.STAGE, cfg_for(model, **sets, max_in_flight=window), run)
        outs[window] = (run / "synth" / shard_name(0, 1)).read_bytes()
    assert outs[1] == outs[7] == outs[None]
    recs = list(read_records(tmp_path / "wNone" / "synth" / shard_name(0, 1)))
    assert sum(1 for r in recs if r["chain"]) >= 5, "too few chained prompts to test the scheduling"
    # resumed after the first round's records, the chains are rebuilt from the records' parsed pairs
    from ipt_hpc.execution.submit import prepare

    run = make_raw(tmp_path / "resumed", 1, docs=36)
    cfg = cfg_for(model, **sets)
    prepare(build(synthesize.STAGE, cfg, run))
    w = RecordWriter(run / "synth" / shard_name(0, 1))
    w.write_many(recs[:14])
    w.flush()
    w.abandon()
    run_stage(synthesize.STAGE, cfg, run)
    assert (run / "synth" / shard_name(0, 1)).read_bytes() == outs[None]
