"""The server engine against a small scripted OpenAI-compatible server (stdlib http.server in a thread): token-id
prompts, explicit sampling fields, EOS stripped, per-prompt errors, retries, fatal answers, the checks before
the first request, and the synthesize stage through it. vLLM's real server: tests/test_vllm.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ipt_hpc.stages.synth_server import ServerEngine, ServerFailed

EOS = 2


class Script:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.busy = 0  # answer 429 this many times
        self.status: int | None = None  # answer this to every completion
        self.health = 200
        self.model = "tiny"
        self.context = 64
        self.tokenizer: Any = None  # a real tokenizer: /tokenize and the completions use it
        self.answer = " <QUE> What is it? <ANS> A shard. </END>"


def handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                return self.reply(script.health, {})
            if self.path == "/v1/models":
                return self.reply(200, {"data": [{"id": script.model, "max_model_len": script.context}]})
            self.reply(404, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                tok = script.tokenizer
                toks = (
                    tok(body["prompt"], add_special_tokens=False)["input_ids"]
                    if tok
                    else [ord(c) % 50 for c in body["prompt"]]
                )
                return self.reply(200, {"tokens": toks, "count": len(toks), "max_model_len": script.context})
            script.bodies.append(body)
            if script.status:
                return self.reply(script.status, {"error": "scripted"})
            if script.busy:
                script.busy -= 1
                return self.reply(429, {"error": "busy"})
            prompt = body["prompt"]
            if 9060 in prompt:
                return self.reply(400, {"error": "Token id 9060 is out of vocabulary"})
            if script.tokenizer is not None:  # a well-formed pair, then EOS
                tok = script.tokenizer
                ids = [
                    *tok(script.answer, add_special_tokens=False)["input_ids"][: body["max_tokens"] - 1],
                    tok.eos_token_id,
                ]
                return self.reply(
                    200, {"choices": [{"text": script.answer, "token_ids": ids, "finish_reason": "stop"}]}
                )
            ids = [*[t + 1 for t in prompt[-3:]][: body["max_tokens"] - 1], EOS]
            self.reply(200, {"choices": [{"text": " ".join(map(str, ids)), "token_ids": ids, "finish_reason": "stop"}]})

    return H


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(script))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()


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
        script.model = "other"
        with pytest.raises(ServerFailed, match=r"serves \['other'\], the run asks for 'tiny'"):
            e.check(ours)
        script.health = 503
        with pytest.raises(ServerFailed, match=r"/health answered 503"):
            e.check(ours)
    finally:
        e.close()


def test_the_synthesize_stage_through_a_served_model(
    server: tuple[str, Script], tiny_synth: Any, tmp_path: Any
) -> None:
    """synth.backend=server: the stage's token-id prompts go to the server, its answers are parsed into pairs;
    the check before the first request passes with the same tokenizer on both sides."""
    from test_fanout import make_raw
    from transformers import AutoTokenizer

    from ipt_hpc.config import load_config
    from ipt_hpc.execution import run_stage, shard_name
    from ipt_hpc.records import read_records
    from ipt_hpc.stages import synthesize

    url, script = server
    script.tokenizer = AutoTokenizer.from_pretrained(str(tiny_synth))
    script.model = str(tiny_synth)
    script.context = 1024
    run = make_raw(tmp_path / "run", 1, docs=12)
    sets = {"synth.model": str(tiny_synth), "synth.backend": "server", "synth.server_url": url,
            "synth.max_new_tokens": 32, "synth.max_model_len": 512, "execution.backend": "debug"}  # fmt: skip
    result = run_stage(synthesize.STAGE, load_config(None, None, sets), run)
    assert result["submitted"] == 1
    records = list(read_records(run / "synth" / shard_name(0, 1)))
    assert len(records) == 12 and all(r["error"] is None for r in records)
    assert all(r["pairs"] == [{"Q": "What is it?", "A": "A shard."}] for r in records), records[0]
    assert all(b["max_tokens"] == 32 and isinstance(b["prompt"][0], int) for b in script.bodies)
