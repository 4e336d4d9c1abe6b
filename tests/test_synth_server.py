"""The server engine against a small scripted OpenAI-compatible server (stdlib http.server in a thread): token-id
prompts, explicit sampling fields, EOS stripped, per-prompt errors, retries, fatal answers, the checks before
the first request, and the synthesize stage through it. vLLM's real server: tests/test_vllm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scripted_openai import EOS, Script, serve

from ipt_hpc.stages.synth_server import ServerEngine, ServerFailed

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    with serve(script) as url:
        yield url, script


def engine(url: str, **kw: Any) -> ServerEngine:
    return ServerEngine(url, "tiny", max_model_len=64, eos=EOS, backoff_s=0.01, **kw)


def test_token_id_prompts_explicit_sampling_and_the_eos_stripped(server: tuple[str, Script]) -> None:
    url, script = server
    e = engine(url)
    try:
        out = e.generate([[5, 6, 7], [10, 11, 12, 13]], 8)
    finally:
        e.close()
    assert [g.ids for g in out] == [[6, 7, 8], [12, 13, 14]] and all(g.error is None for g in out)
    body = script.bodies[0]
    assert body["prompt"] in ([5, 6, 7], [10, 11, 12, 13]) and body["max_tokens"] == 8
    assert body["temperature"] == 0.0 and body["return_token_ids"] is True and body["model"] == "tiny"


def test_a_rejected_prompt_is_that_records_error_and_busy_answers_are_retried(server: tuple[str, Script]) -> None:
    url, script = server
    script.busy = 2
    e = engine(url, concurrency=1)
    try:
        out = e.generate([[1, 9060], [3, 4]], 8)
    finally:
        e.close()
    assert out[0].error and "out of vocabulary" in out[0].error and out[1].ids == [4, 5]
    assert len(script.bodies) == 4  # two 429s, then both prompts


@pytest.mark.parametrize("status", [401, 404])
def test_an_unauthorised_or_missing_endpoint_fails_the_shard_at_once(server: tuple[str, Script], status: int) -> None:
    url, script = server
    script.status = status
    e = engine(url)
    try:
        with pytest.raises(ServerFailed, match=rf"answered {status}"):
            e.generate([[1, 2]], 4)
    finally:
        e.close()
    assert len(script.bodies) == 1  # not retried


def test_a_server_that_is_gone_is_retried_then_fails_the_shard() -> None:
    e = engine("http://127.0.0.1:9", retries=2)
    try:
        with pytest.raises(ServerFailed, match=r"failed 3 times; last: ClientConnectorError"):
            e.generate([[1, 2]], 4)
    finally:
        e.close()


def test_over_budget_prompts_never_reach_the_server(server: tuple[str, Script]) -> None:
    url, script = server
    e = engine(url)
    try:
        out = e.generate([list(range(60))], 8)
    finally:
        e.close()
    assert out[0].error == "prompt of 60 tokens + 8 exceeds 64" and script.bodies == []


def test_checks_before_the_first_request_name_both_sides(server: tuple[str, Script]) -> None:
    url, script = server
    ours = [ord(c) % 50 for c in ServerEngine.PROBE]
    e = engine(url)
    try:
        assert e.check(ours) == {"model": "tiny", "max_model_len": 64}
        with pytest.raises(
            ServerFailed, match=r"the server's tokenizer gives \[.*\] for the probe text, ours \[1, 2\]"
        ):
            e.check([1, 2])
        script.context = 32
        with pytest.raises(ServerFailed, match=r"synth.max_model_len 64 exceeds the server's context 32"):
            e.check(ours)
        script.tokenize_status = 404
        with pytest.raises(ServerFailed, match=r"/tokenize answered 404: token-id prompts need a server"):
            e.check(ours)
        script.tokenize_status = 200
        script.model = "other"
        with pytest.raises(ServerFailed, match=r"serves \['other'\], the run asks for 'tiny'"):
            e.check(ours)
        script.health = 503
        with pytest.raises(ServerFailed, match=r"/health answered 503"):
            e.check(ours)
    finally:
        e.close()


def scripted(script: Script, model: Path) -> None:
    from transformers import AutoTokenizer

    script.tokenizer = AutoTokenizer.from_pretrained(str(model))
    script.model, script.context = str(model), 1024


def synth_cfg(model: Path, **sets: Any) -> Any:
    from ipt_hpc.config import load_config

    base = {"synth.model": str(model), "synth.backend": "server", "synth.max_new_tokens": 32,
            "synth.max_model_len": 512, "execution.backend": "debug"}  # fmt: skip
    return load_config(None, None, {**base, **sets})


def synth(run: Path, cfg: Any, spec: str = "all") -> dict[str, Any]:
    from ipt_hpc.execution import run_stage
    from ipt_hpc.stages import synthesize

    return run_stage(synthesize.STAGE, cfg, run, spec)


def test_the_synthesize_stage_through_a_served_model(
    server: tuple[str, Script], tiny_synth: Path, tmp_path: Path
) -> None:
    """synth.backend=server: the stage's token-id prompts go to the server, its answers are parsed into pairs;
    the check before the first request passes with the same tokenizer on both sides; finish reasons and the
    server's token counts are kept."""
    from test_fanout import make_raw

    from ipt_hpc.execution import StageState, shard_name
    from ipt_hpc.records import read_records

    url, script = server
    scripted(script, tiny_synth)
    run = make_raw(tmp_path / "run", 1, docs=12)
    assert synth(run, synth_cfg(tiny_synth, **{"synth.server.url": url}))["submitted"] == 1
    name = shard_name(0, 1)
    records = list(read_records(run / "synth" / name))
    assert len(records) == 12 and all(r["error"] is None and r["finish_reason"] == "stop" for r in records)
    assert all(r["pairs"] == [{"Q": "What is it?", "A": "A shard."}] for r in records), records[0]
    assert all(b["max_tokens"] == 32 for b in script.bodies)
    sent = [p for b in script.bodies for p in (b["prompt"] if isinstance(b["prompt"][0], list) else [b["prompt"]])]
    assert len(sent) == 12 and all(isinstance(i, int) for p in sent for i in p)  # token ids, every prompt once
    stats = StageState(run / "synth").read("done", name)
    assert stats["finish_reasons"] == {"stop": 12}
    usage = stats["server"]["usage"]
    assert usage["prompts"] == 12 and usage["requests"] == len(script.bodies) <= 12
    assert usage["prompt_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert usage["completion_tokens"] == sum(r["gen_tokens"] + 1 for r in records)  # + the EOS stripped


def test_prompts_submitted_together_share_requests_and_a_rejected_one_is_found(server: tuple[str, Script]) -> None:
    """A burst of submissions goes out prompts_per_request to a request (the server's cost per request is paid
    less often); when the server rejects a request of several prompts, each is asked alone, so only the bad
    one gets the error."""
    url, script = server
    e = engine(url, prompts_per_request=4)
    try:
        e._loop.call_soon_threadsafe(time.sleep, 0.5)  # the client busy: the whole burst is pending when it looks
        out = e.generate([[k, k + 1] for k in range(10)], 8)
        assert [g.ids for g in out] == [[k + 1, k + 2] for k in range(10)]
        assert sorted(script.requests) == [2, 4, 4] and e.usage["requests"] == 3 and e.usage["prompts"] == 10
        script.requests = []
        out = e.generate([[1, 2], [1, 9060], [3, 4]], 8)
    finally:
        e.close()
    assert out[1].error and "out of vocabulary" in out[1].error
    assert [out[0].ids, out[2].ids] == [[2, 3], [4, 5]] and script.requests == [1, 1]


def test_finish_reasons_and_a_server_that_miscounts_the_prompt(server: tuple[str, Script]) -> None:
    url, script = server
    e = engine(url)
    try:
        out = e.generate([[5, 6, 7], [10, 11, 12, 13]], 8)
        assert [g.finish_reason for g in out] == ["stop", "stop"]
        assert e.usage == {"prompt_tokens": 7, "completion_tokens": 8, "requests": 2, "prompts": 2}
        script.usage_offset = 1  # the server did not take the ids as sent
        with pytest.raises(ServerFailed, match=r"counted 4 prompt tokens for the 3 ids sent"):
            e.generate([[5, 6, 7]], 8)
    finally:
        e.close()


def test_an_engine_that_died_fails_the_shard_at_once(server: tuple[str, Script]) -> None:
    """A 503 is retried unless /health says the engine is dead (503 there too): then one line, no more retries."""
    url, script = server
    script.status, script.health = 503, 503
    e = engine(url, retries=5)
    try:
        with pytest.raises(ServerFailed, match=r"/health answered 503: the server's engine died"):
            e.generate([[1, 2]], 4)
    finally:
        e.close()
    assert len(script.bodies) == 1


def test_a_malformed_answer_fails_the_shard_instead_of_hanging(server: tuple[str, Script]) -> None:
    url, script = server
    script.garbage = True
    e = engine(url)
    got: list[BaseException] = []

    def run() -> None:
        try:
            e.generate([[1, 2]], 4)
        except BaseException as exc:  # noqa: BLE001 - handed to the assertion below
            got.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    e.close()
    assert not worker.is_alive(), "collect() hung on a malformed answer"
    assert isinstance(got[0], ServerFailed) and "/v1/completions: AttributeError" in str(got[0]), got


def test_cancel_drops_the_requests_in_flight(server: tuple[str, Script]) -> None:
    """A shard that stops (fails, is preempted) cancels its requests: none of their answers reaches the next
    shard, and the engine takes new requests at once."""
    url, script = server
    script.delay_s = 1.5
    e = engine(url)
    try:
        for key in range(3):
            e.submit(key, [key + 1, 7], 4)
        time.sleep(0.3)  # the requests are at the server
        assert e.in_flight() == 3
        e.cancel()
        assert e.in_flight() == 0
        deadline = time.time() + 5
        while e._tasks and time.time() < deadline:  # the client-side requests end (their connections close)
            time.sleep(0.05)
        assert not e._tasks
        script.delay_s = 0.0
        e.submit(9, [3, 4], 4)
        assert e.collect() == [(9, e.generate([[3, 4]], 4)[0])]
        time.sleep(1.5)  # the cancelled requests' answers would have come back by now
        assert e.in_flight() == 0 and e._done.empty()
    finally:
        e.close()


def test_a_shard_the_server_fails_midway_resumes_to_identical_bytes(
    server: tuple[str, Script], tiny_synth: Path, tmp_path: Path
) -> None:
    """The server answers 401 after 5 requests: the shard fails with one line, its durable records stay; the
    rerun resumes after them and ends with the bytes of an uninterrupted run."""
    from test_fanout import make_raw

    from ipt_hpc.errors import IptError
    from ipt_hpc.execution import StageState, shard_name

    url, script = server
    scripted(script, tiny_synth)
    cfg = synth_cfg(tiny_synth, **{"synth.server.url": url, "synth.chunk_docs": 2, "synth.max_in_flight": 1})
    ref = make_raw(tmp_path / "ref", 1, docs=12)
    synth(ref, cfg)
    name = shard_name(0, 1)
    want = (ref / "synth" / name).read_bytes()
    run = make_raw(tmp_path / "run", 1, docs=12)
    script.bodies, script.status, script.fail_after = [], 401, 5
    with pytest.raises(IptError, match=r"answered 401"):
        synth(run, cfg)
    state = StageState(run / "synth")
    error = state.read("failed", name)["error"]
    assert "answered 401" in error and "\n" not in error.strip()
    script.status = None
    synth(run, cfg, "failed")
    assert (run / "synth" / name).read_bytes() == want
    resumed = next(e for e in state.events(name) if e["event"] == "resumed")
    assert resumed["records"] == 5  # the 5 answered documents (a failing shard flushes what it wrote)


def test_a_shared_server_that_is_still_starting_is_waited_for() -> None:
    """url mode: array tasks may start before the shared server listens; /health is polled up to a deadline."""
    from http.server import ThreadingHTTPServer

    from scripted_openai import handler

    from ipt_hpc.stages.synth_launch import free_port

    port = free_port()
    e = engine(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ServerFailed, match=r"did not answer /health within 0.3 s .*; last: URLError"):
            e.wait_ready(0.3, poll_s=0.1)
        httpd: list[Any] = []
        later = threading.Timer(1.0, lambda: httpd.append(ThreadingHTTPServer(("127.0.0.1", port), handler(Script()))))
        later.start()
        try:
            threading.Thread(target=lambda: (later.join(), httpd[0].serve_forever()), daemon=True).start()
            assert e.wait_ready(30, poll_s=0.1) >= 0.9
        finally:
            later.join()
            httpd[0].shutdown()
            httpd[0].server_close()
    finally:
        e.close()


# -- launch mode: the task starts the server (here the scripted one, as a module; vLLM's: test_vllm.py) ------
@pytest.fixture
def launchable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The scripted server importable by the launched process; engines closed (their servers stopped) after."""
    from ipt_hpc.stages import synth_engines

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    yield
    synth_engines.close_engines()


def launch_cfg(model: Path, **sets: Any) -> Any:
    return synth_cfg(model, **{"synth.server.launch": True, "synth.server.module": "scripted_openai",
                               "synth.server.startup_timeout_s": 120, **sets})  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def launched_pid() -> int:
    from ipt_hpc.stages import synth_engines

    (engine,) = synth_engines._ENGINES.values()
    return engine.server.proc.pid


def test_launch_mode_starts_logs_and_stops_its_server(launchable: None, tiny_synth: Path, tmp_path: Path) -> None:
    from test_fanout import make_raw

    from ipt_hpc.execution import StageState, shard_name
    from ipt_hpc.records import read_records
    from ipt_hpc.stages import synth_engines

    run = make_raw(tmp_path / "run", 1, docs=8)
    synth(run, launch_cfg(tiny_synth))
    name = shard_name(0, 1)
    assert [r["pairs"] for r in read_records(run / "synth" / name)] == [[{"Q": "What is it?", "A": "A shard."}]] * 8
    server = StageState(run / "synth").read("done", name)["server"]
    log = Path(server["log"])
    assert log.parent == run / "synth" / "_state" / "logs" / "shards" and server["startup_s"] > 0
    assert "ipt_hpc launches:" in log.read_text() and "scripted server on 127.0.0.1" in log.read_text()
    assert server["url"].startswith("http://127.0.0.1:") and server["usage"]["prompts"] == 8
    pid = launched_pid()
    assert alive(pid)
    synth_engines.close_engines()  # what the task's exit does
    assert not alive(pid)


def test_a_launched_server_killed_mid_shard_fails_it_and_the_rerun_resumes(
    launchable: None, tiny_synth: Path, tmp_path: Path
) -> None:
    """SIGKILL to the launched server while the shard runs: the shard fails at once with one line naming the
    exit, and the rerun (a new server) resumes after the durable records to the bytes of an uninterrupted run."""
    from test_fanout import make_raw

    from ipt_hpc.errors import IptError
    from ipt_hpc.execution import StageState, shard_name
    from ipt_hpc.records import partial_path
    from ipt_hpc.stages import synth_engines

    cfg = launch_cfg(tiny_synth, **{"synth.chunk_docs": 2, "synth.max_in_flight": 1, "synth.server.retries": 8,
                                    "synth.vllm_args": {"delay_s": 0.15}})  # fmt: skip
    ref = make_raw(tmp_path / "ref", 1, docs=24)
    synth(ref, cfg)
    name = shard_name(0, 1)
    want = (ref / "synth" / name).read_bytes()
    synth_engines.close_engines()

    run = make_raw(tmp_path / "run", 1, docs=24)
    killed: list[int] = []

    def kill_when_durable() -> None:
        deadline = time.time() + 120
        part = partial_path(run / "synth" / name)
        while time.time() < deadline and not (part.exists() and part.stat().st_size):
            time.sleep(0.02)
        pid = launched_pid()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_when_durable)
    killer.start()
    try:
        with pytest.raises(IptError, match=r"the launched server exited with code -9"):
            synth(run, cfg)
    finally:
        killer.join()
    state = StageState(run / "synth")
    error = state.read("failed", name)["error"]
    assert "the launched server exited with code -9" in error and "\n" not in error.strip(), error
    synth(run, cfg, "failed")
    assert (run / "synth" / name).read_bytes() == want
    resumed = next(e for e in state.events(name) if e["event"] == "resumed")
    assert 2 <= resumed["records"] < 24


@pytest.mark.parametrize("end", ["exit", "sigkill"])
def test_a_launched_server_does_not_outlive_its_task(tiny_synth: Path, tmp_path: Path, end: str) -> None:
    """The task process exits (atexit stops the server) or is SIGKILLed (the server gets its parent-death TERM)."""
    code = f"""
import os, signal, sys
from pathlib import Path
from ipt_hpc.stages.synth_launch import LaunchedServer
s = LaunchedServer(("-m", "scripted_openai", "--model", {str(tiny_synth)!r}), Path({str(tmp_path)!r}))
s.start({str(tiny_synth)!r}, 120)
print(s.proc.pid, flush=True)
if {end!r} == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == (-9 if end == "sigkill" else 0), proc.stderr[-2000:]
    pid = int(proc.stdout.split()[0])
    deadline = time.time() + 30
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_launch_mode_reports_a_server_that_cannot_start(tiny_synth: Path, tmp_path: Path) -> None:
    from ipt_hpc.stages.synth_launch import LaunchedServer

    s = LaunchedServer(("-m", "no_such_server_module"), tmp_path)
    with pytest.raises(
        ServerFailed,
        match=r"exited with code 1 \(log .*server-.*\.log; last line: .*No module named no_such_server_module",
    ):
        s.start("tiny", 60)


def test_preflight_and_plan_know_the_server_backend(server: tuple[str, Script], tiny_synth: Path) -> None:
    from ipt_hpc.planning.estimate import _stage_gpus
    from ipt_hpc.preflight import stage_models

    url, script = server
    scripted(script, tiny_synth)
    assert stage_models(synth_cfg(tiny_synth, **{"synth.server.url": url}), "synthesize") == []
    [p] = stage_models(synth_cfg(tiny_synth, **{"synth.server.url": "http://127.0.0.1:9"}), "synthesize")
    assert p.key == "synth.server.url" and "cannot be reached from here" in p.line()
    [p] = stage_models(
        synth_cfg(tiny_synth, **{"synth.server.url": url, "synth.server.served_model": "x"}), "synthesize"
    )
    assert p.line().startswith(f"synth.server.url={url}: serves [") and "not 'x'" in p.line()
    [p] = stage_models(launch_cfg(tiny_synth, **{"synth.server.module": "no_such_server_module"}), "synthesize")
    assert p.key == "synth.server.module" and "not importable" in p.line()
    cfg = synth_cfg(tiny_synth, **{"synth.server.url": url, "execution.backend": "slurm",
                                   "execution.slurm.gpus_per_node": 1})  # fmt: skip
    assert _stage_gpus(cfg, "synthesize") == 0  # the server's GPUs are its own job's
    assert _stage_gpus(launch_cfg(tiny_synth, **{"execution.slurm.gpus_per_node": 1}), "synthesize") == 1


def test_the_stage_identity_leaves_out_where_the_server_is(tiny_synth: Path, tmp_path: Path) -> None:
    """A shared server restarted elsewhere (another URL, other client limits) resumes the same stage folder; a
    different served model does not."""
    from ipt_hpc.execution import build
    from ipt_hpc.stages import synthesize

    def hash_of(**sets: Any) -> str:
        return build(synthesize.STAGE, synth_cfg(tiny_synth, **sets), tmp_path, num_shards=1).config_hash()

    first = hash_of(**{"synth.server.url": "http://a:8000"})
    assert first == hash_of(**{"synth.server.url": "http://b:9000", "synth.server.retries": 9,
                               "synth.server.prompts_per_request": 1, "synth.server.concurrency": 4})  # fmt: skip
    assert first != hash_of(**{"synth.server.url": "http://a:8000", "synth.server.served_model": "other"})
    assert first != hash_of(**{"synth.server.url": "http://a:8000", "synth.max_new_tokens": 31})
    # another backend: the server section is not part of its identity (its folders keep their earlier hash)
    assert hash_of(**{"synth.backend": "transformers"}) == hash_of(
        **{"synth.backend": "transformers", "synth.server.served_model": "other", "synth.server.launch": True}
    )
