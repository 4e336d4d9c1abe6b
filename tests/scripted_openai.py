"""A small scripted OpenAI-compatible server (stdlib http.server) for the server engine's tests.

In a thread (:func:`serve`) the tests change its :class:`Script` as they go; as a module (``python -m
scripted_openai --model DIR --port P ...``, the arguments vLLM's server takes, unknown ones ignored) it is what
``synth.server.launch`` starts in the main suite, where vLLM is not installed. With a tokenizer (``--model``) it
answers every prompt with one well-formed pair, then EOS; without one, with the prompt's last ids plus one.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EOS = 2


class Script:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.busy = 0  # answer 429 this many times
        self.status: int | None = None  # answer this to every completion
        self.fail_after: int | None = None  # answer self.status only after this many completions
        self.health = 200
        self.tokenize_status = 200
        self.model = "tiny"
        self.context = 64
        self.delay_s = 0.0  # per completion
        self.usage_offset = 0  # added to the prompt tokens the server reports
        self.garbage = False  # answer 200 with a body that is no completion
        self.requests: list[int] = []  # prompts per answered completion request
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
                if script.tokenize_status != 200:
                    return self.reply(script.tokenize_status, {"detail": "Not Found"})
                tok = script.tokenizer
                toks = (
                    tok(body["prompt"], add_special_tokens=False)["input_ids"]
                    if tok
                    else [ord(c) % 50 for c in body["prompt"]]
                )
                return self.reply(200, {"tokens": toks, "count": len(toks), "max_model_len": script.context})
            script.bodies.append(body)
            if script.delay_s:
                time.sleep(script.delay_s)
            if script.status and (script.fail_after is None or len(script.bodies) > script.fail_after):
                return self.reply(script.status, {"error": "scripted"})
            if script.busy:
                script.busy -= 1
                return self.reply(429, {"error": "busy"})
            if script.garbage:
                return self.reply(200, {"choices": "not a list"})
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            if any(9060 in prompt for prompt in prompts):
                return self.reply(400, {"error": "Token id 9060 is out of vocabulary"})
            choices = []
            for index, prompt in enumerate(prompts):
                if script.tokenizer is not None:  # a well-formed pair, then EOS
                    tok = script.tokenizer
                    ids = [*tok(script.answer, add_special_tokens=False)["input_ids"][: body["max_tokens"] - 1]]
                    ids.append(tok.eos_token_id)
                    text = script.answer
                else:
                    ids = [*[t + 1 for t in prompt[-3:]][: body["max_tokens"] - 1], EOS]
                    text = " ".join(map(str, ids))
                choices.append({"index": index, "text": text, "token_ids": ids, "finish_reason": "stop"})
            script.requests.append(len(prompts))
            usage = {
                "prompt_tokens": sum(len(p) for p in prompts) + script.usage_offset,
                "completion_tokens": sum(len(c["token_ids"]) for c in choices),
            }
            self.reply(200, {"choices": choices[::-1], "usage": usage})  # in any order: the client sorts

    return H


@contextmanager
def serve(script: Script) -> Iterator[str]:
    """The server in a thread of this process, on a free loopback port: yields its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(script))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    from transformers import AutoTokenizer

    script = Script()
    script.tokenizer = AutoTokenizer.from_pretrained(args.model)
    script.model = args.served_model_name or args.model
    script.context = args.max_model_len
    script.delay_s = args.delay_s
    httpd = ThreadingHTTPServer((args.host, args.port), handler(script))
    print(f"scripted server on {args.host}:{args.port}, serving {script.model}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
