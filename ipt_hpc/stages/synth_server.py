"""``synth.backend: server``: generation through an OpenAI-compatible ``/v1/completions`` server (vLLM's),
running (``synth.server.url``) or started by the task (``synth.server.launch``, :mod:`.synth_launch`).

The engine keeps the stage's exact token budgets over HTTP: prompts are token ids (``prompt`` as a list of
ints), every sampling field is sent (greedy), ``max_tokens`` is the stage's and a longer generation is an
error, and the generated ids come back as ids (``return_token_ids``), the trailing EOS stripped as the
in-process vLLM engine strips it. One asyncio client (aiohttp) runs in a thread of its own; ``submit`` hands a
request to it (at most ``concurrency`` in flight), ``collect`` returns the finished ones.

Errors: a 400/422 for one prompt is that record's error; connection errors, timeouts, 429 and 502-504 are
retried with exponential backoff and jitter, then fail the shard; 401/403/404 fail the shard at once, and so
does a ``/health`` that is not 200 before the first request (an engine that died answers 503). A shard failure
is raised by ``collect`` as one line.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..errors import IptError
from .synth_engines import Generation

RETRY = {429, 502, 503, 504}
FATAL = {401, 403, 404}


class ServerFailed(IptError):
    """The server cannot serve this shard (one line saying why)."""


class ServerEngine:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        max_model_len: int,
        eos: int | None,
        concurrency: int = 64,
        timeout_s: float = 600.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        repetition_penalty: float = 1.0,
        died: Callable[[], str | None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.max_model_len = max_model_len
        self.eos = eos
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.repetition_penalty = repetition_penalty
        self.died = died  # a launched server's process: why it is gone, None while it runs
        self.usage: Counter[str] = Counter()  # the server's token counts over this engine's requests
        self._done: queue.Queue[tuple[int, Generation] | BaseException] = queue.Queue()
        self._outstanding = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="synth-server-client", daemon=True)
        self._thread.start()
        self._session: Any = None
        self._limit: asyncio.Semaphore | None = None
        self.tokenizer: Any = None  # ours (connect() sets it): the stage builds prompt ids with it
        self.info: dict[str, Any] = {}  # what check() found
        self.server: Any = None  # a launched server (synth_launch.LaunchedServer): stopped by close()

    # -- the engine interface ---------------------------------------------------------------------
    def capacity(self) -> int:
        return 2 * self.concurrency

    def batch(self) -> int:
        return self.concurrency

    def in_flight(self) -> int:
        return self._outstanding

    def submit(self, key: int, prompt: list[int], max_new_tokens: int) -> None:
        self._outstanding += 1
        if not prompt or len(prompt) + max_new_tokens > self.max_model_len:
            gen = Generation([], "", f"prompt of {len(prompt)} tokens + {max_new_tokens} exceeds {self.max_model_len}")
            self._done.put((key, gen))
            return
        asyncio.run_coroutine_threadsafe(self._start(key, prompt, max_new_tokens), self._loop)

    def collect(self) -> list[tuple[int, Generation]]:
        out: list[tuple[int, Generation]] = []
        if self._outstanding == 0:
            return out
        item = self._done.get()  # at least one
        while True:
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            out.append(item)
            self._outstanding -= 1
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        for key, prompt in enumerate(prompts):
            self.submit(key, prompt, max_new_tokens)
        got: dict[int, Generation] = {}
        while self._outstanding:
            got.update(self.collect())
        return [got[k] for k in range(len(prompts))]

    def usable(self) -> bool:
        """False once a launched server has exited (the engine cache then starts another)."""
        return self.server is None or self.server.exited() is None

    def cancel(self) -> None:
        """Drop what is in flight (a failed shard, a preempted task): the requests are cancelled client-side,
        which closes their connections (vLLM aborts a request whose client went away)."""

        def stop() -> None:
            for task in list(self._tasks):
                task.cancel()

        self._loop.call_soon_threadsafe(stop)
        self._outstanding = 0
        self._done = queue.Queue()

    def close(self) -> None:
        self.cancel()

        async def shut() -> None:
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if self.server is not None:
            self.server.stop()

    # -- before the first request -------------------------------------------------------------------
    def wait_ready(self, deadline_s: float, poll_s: float = 5.0) -> float:
        """A shared server may still be starting when the task does (nothing listens yet): ``/health`` is
        polled until it answers 200, for at most ``deadline_s``; a 503 (an engine that died) fails at once.
        Returns the seconds waited."""
        import urllib.error
        import urllib.request

        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=10) as resp:
                    if resp.status == 200:
                        return round(time.monotonic() - t0, 1)
                    last = f"/health answered {resp.status}"
            except urllib.error.HTTPError as exc:
                if exc.code == 503:
                    raise ServerFailed(
                        f"synthesize: {self.url}/health answered 503: the server's engine died"
                    ) from None
                last = f"/health answered {exc.code}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - t0 >= deadline_s:
                raise ServerFailed(
                    f"synthesize: {self.url} did not answer /health within {deadline_s:g} s"
                    f" (synth.server.startup_timeout_s); last: {last}"
                )
            time.sleep(poll_s)

    PROBE = "Instruction pre-training probe: <CON> Ünïcode, digits 12345 and\n\nnewlines. </CON>"

    def check(self, our_ids: list[int]) -> dict[str, Any]:
        """Health, the served model's name, the server's tokenizer against ours (``our_ids``: our tokenizer's ids
        of :attr:`PROBE` without special tokens; token-id prompts need the same vocabulary) and its context
        length against the run's budget. Each mismatch is one line naming both sides."""
        return asyncio.run_coroutine_threadsafe(self._check(our_ids), self._loop).result(self.timeout_s + 5)

    async def _check(self, our_ids: list[int]) -> dict[str, Any]:
        import aiohttp

        session = await self._client()
        try:
            async with session.get(f"{self.url}/health") as resp:
                if resp.status != 200:
                    raise ServerFailed(
                        f"synthesize: {self.url}/health answered {resp.status}: the server's engine is not up"
                    )
            async with session.get(f"{self.url}/v1/models") as resp:
                served = [m.get("id") for m in (await resp.json(content_type=None)).get("data", [])]
            if self.model not in served:
                raise ServerFailed(
                    f"synthesize: {self.url} serves {served}, the run asks for {self.model!r} (synth.model)"
                )
            body = {"model": self.model, "prompt": self.PROBE, "add_special_tokens": False}
            async with session.post(f"{self.url}/tokenize", json=body) as resp:
                if resp.status != 200:
                    raise ServerFailed(
                        f"synthesize: {self.url}/tokenize answered {resp.status}: token-id prompts need a server"
                        " that shows its tokenizer (vLLM's OpenAI server) to compare it with ours"
                    )
                tok = await resp.json(content_type=None)
        except aiohttp.ClientError as exc:
            raise ServerFailed(f"synthesize: {self.url} cannot be reached: {type(exc).__name__}: {exc}") from None
        if tok.get("tokens") != our_ids:
            raise ServerFailed(
                f"synthesize: the server's tokenizer gives {tok.get('tokens')} for the probe text, ours {our_ids}:"
                " token-id prompts need the same vocabulary (serve the run's synth.model)"
            )
        context = int(tok.get("max_model_len") or 0)
        if context and context < self.max_model_len:
            raise ServerFailed(
                f"synthesize: synth.max_model_len {self.max_model_len} exceeds the server's context {context}"
                " (--max-model-len of the server)"
            )
        return {"model": self.model, "max_model_len": context}

    # -- the client ---------------------------------------------------------------------------------
    async def _start(self, key: int, prompt: list[int], max_new_tokens: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            self._done.put((key, await self._request(prompt, max_new_tokens)))
        except asyncio.CancelledError:
            pass
        except ServerFailed as exc:
            self._done.put(exc)
        finally:
            self._tasks.discard(task)

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self._limit = asyncio.Semaphore(self.concurrency)
        return self._session

    def body(self, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
        """Every sampling field explicit: a server fills what is left out from the model's generation config."""
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "n": 1,
            "seed": 0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": self.repetition_penalty,
            "stream": False,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }

    async def _request(self, prompt: list[int], max_new_tokens: int) -> Generation:
        import aiohttp

        session = await self._client()
        assert self._limit is not None
        url = f"{self.url}/v1/completions"
        last = ""
        async with self._limit:
            for attempt in range(self.retries + 1):
                if attempt:
                    await self._gone(last)
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
                try:
                    async with session.post(url, json=self.body(prompt, max_new_tokens)) as resp:
                        if resp.status == 200:
                            return self._generation(await resp.json(), prompt, max_new_tokens)
                        detail = " ".join((await resp.text())[:300].split())
                        if resp.status in (400, 422):
                            return Generation([], "", f"server rejected the prompt ({resp.status}): {detail}")
                        if resp.status in FATAL:
                            raise ServerFailed(f"synthesize: {url} answered {resp.status}: {detail}")
                        last = f"{resp.status}: {detail}"
                        if resp.status not in RETRY:
                            raise ServerFailed(f"synthesize: {url} answered {last}")
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
        await self._gone(last)
        raise ServerFailed(f"synthesize: {url} failed {self.retries + 1} times; last: {last}")

    async def _gone(self, last: str) -> None:
        """Before a retry: a launched server whose process exited, or an engine that died (``/health`` 503),
        fails the shard at once; a busy or restarting server is given its backoff."""
        why = self.died() if self.died else None
        if why:
            raise ServerFailed(f"synthesize: {why} (last answer: {last})")
        session = await self._client()
        try:
            async with session.get(f"{self.url}/health", timeout=_short()) as resp:
                if resp.status == 503:
                    raise ServerFailed(f"synthesize: {self.url}/health answered 503: the server's engine died")
        except (OSError, asyncio.TimeoutError, _client_error()):
            pass  # unreachable: retried

    def _generation(self, data: dict[str, Any], prompt: list[int], max_new_tokens: int) -> Generation:
        choice = data["choices"][0]
        ids = list(choice.get("token_ids") or [])
        if len(ids) > max_new_tokens:
            raise ServerFailed(f"synthesize: the server generated {len(ids)} tokens for max_tokens {max_new_tokens}")
        usage = data.get("usage") or {}
        if usage.get("prompt_tokens", len(prompt)) != len(prompt):
            raise ServerFailed(
                f"synthesize: the server counted {usage['prompt_tokens']} prompt tokens for the {len(prompt)} ids"
                " sent: it does not take token-id prompts as they are"
            )
        self.usage.update({k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")})
        self.usage["requests"] += 1
        if ids and self.eos is not None and ids[-1] == self.eos:
            ids.pop()
        return Generation(ids, choice.get("text", ""), None, choice.get("finish_reason"))


def _short() -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=10)


def _client_error() -> type[BaseException]:
    import aiohttp

    return aiohttp.ClientError


def connect(
    model: str,
    *,
    url: str | None,
    served_model: str,
    max_model_len: int,
    concurrency: int,
    timeout_s: float,
    retries: int,
    repetition_penalty: float = 1.0,
    launch: tuple[str, ...] | None = None,
    startup_timeout_s: float = 900.0,
    log_dir: str | None = None,
) -> ServerEngine:
    """The engine of a task: our tokenizer (``synth.model``: the stage builds the prompts' ids with it), the
    server (``url``, or ``launch``: the server module's arguments, started here and stopped with the engine)
    checked against it before the first request."""
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    server = None
    if launch is not None:
        from .synth_launch import LaunchedServer

        server = LaunchedServer(launch, Path(log_dir or "."))
        server.start(served_model, startup_timeout_s)
        url = server.url
    if not url:
        raise ServerFailed("synthesize: synth.backend=server needs synth.server.url or synth.server.launch")
    engine = ServerEngine(
        url,
        served_model,
        max_model_len=max_model_len,
        eos=tokenizer.eos_token_id,
        concurrency=concurrency,
        timeout_s=timeout_s,
        retries=retries,
        repetition_penalty=repetition_penalty,
        died=server.exited if server else None,
    )
    engine.tokenizer = tokenizer
    engine.server = server
    try:
        waited = engine.wait_ready(startup_timeout_s) if server is None else 0.0
        engine.info = engine.check(tokenizer(ServerEngine.PROBE, add_special_tokens=False)["input_ids"])
    except BaseException:
        engine.close()
        raise
    if server is not None:
        engine.info.update(startup_s=server.startup_s, log=str(server.log))
    elif waited:
        engine.info["waited_s"] = waited  # for a shared server that was still starting
    return engine
