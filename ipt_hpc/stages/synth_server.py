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

import orjson

from .synth_engines import Generation
from .synth_launch import ServerFailed

RETRY = {429, 502, 503, 504}
# requests in flight per task unless synth.server.concurrency (or synth.max_in_flight) says: vLLM's default
# max_num_seqs, so one task can keep a server's batch full, as the in-process engine's window does
DEFAULT_CONCURRENCY = 256
FATAL = {401, 403, 404}
JSON = {"Content-Type": "application/json"}


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
        prompts_per_request: int = 1,
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
        self.prompts_per_request = max(1, min(prompts_per_request, concurrency))
        self._pending: list[tuple[int, list[int], int]] = []  # submitted, not yet handed to the client
        self._pending_lock = threading.Lock()
        self._drain_due = False
        self._free = concurrency  # prompts that may still go out (the client's bound)
        self._room: asyncio.Condition | None = None
        self.died = died  # a launched server's process: why it is gone, None while it runs
        self.usage: Counter[str] = Counter()  # the server's token counts over this engine's requests
        self._done: queue.Queue[tuple[int, Generation] | BaseException] = queue.Queue()
        self._outstanding = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="synth-server-client", daemon=True)
        self._thread.start()
        self._session: Any = None
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
        with self._pending_lock:  # the client takes what piled up since it last looked: one request per
            self._pending.append((key, prompt, max_new_tokens))  # prompts_per_request of them, no timer
            if self._drain_due:
                return
            self._drain_due = True
        self._loop.call_soon_threadsafe(self._drain)

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

        with self._pending_lock:
            self._pending = []

        self._loop.call_soon_threadsafe(stop)
        self._outstanding = 0
        self._done = queue.Queue()

    def close(self) -> None:
        """Stop the client (and a launched server); a second call does nothing."""
        if not self._thread.is_alive():
            return
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
    def _drain(self) -> None:
        """In the client's loop: what was submitted since it last looked goes out, ``prompts_per_request`` prompts
        to a request (a burst of submissions shares requests; a lone one goes alone, without waiting)."""
        with self._pending_lock:
            items, self._pending, self._drain_due = self._pending, [], False
        step = self.prompts_per_request
        for i in range(0, len(items), step):
            self._loop.create_task(self._start(items[i : i + step]))

    async def _start(self, items: list[tuple[int, list[int], int]]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            gens = await self._request([prompt for _, prompt, _ in items], items[0][2])
            for (key, _, _), gen in zip(items, gens, strict=True):
                self._done.put((key, gen))
        except asyncio.CancelledError:
            pass
        except ServerFailed as exc:
            self._done.put(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed answer: the shard fails, collect() never hangs
            self._done.put(ServerFailed(f"synthesize: {self.url}/v1/completions: {type(exc).__name__}: {exc}"))
        finally:
            self._tasks.discard(task)

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            # aiohttp's connector holds 100 connections by default: more requests would wait in the client
            # instead of in the server's batch
            connector = aiohttp.TCPConnector(limit=self.concurrency + 4)  # + the checks' /health requests
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
            self._room = asyncio.Condition()
        return self._session

    def body(self, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
        """Every sampling field explicit: a server fills what is left out from the model's generation config.
        One prompt goes as a list of ids, several as a list of such lists (one choice each, by index)."""
        return {
            "model": self.model,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
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

    async def _request(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """The generations of ``prompts`` (one request). A 400/422 answer to several prompts is asked again one
        prompt a request, so only the prompt the server rejects gets the error."""
        import aiohttp

        session = await self._client()
        assert self._room is not None
        url = f"{self.url}/v1/completions"
        last = ""
        async with self._room:  # at most `concurrency` prompts out (taken at once: no partial holds)
            await self._room.wait_for(lambda: self._free >= len(prompts))
            self._free -= len(prompts)
        try:
            for attempt in range(self.retries + 1):
                if attempt:
                    await self._gone(last)
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
                try:
                    body = orjson.dumps(self.body(prompts, max_new_tokens))
                    async with session.post(url, data=body, headers=JSON) as resp:
                        if resp.status == 200:
                            return self._generations(orjson.loads(await resp.read()), prompts, max_new_tokens)
                        detail = " ".join((await resp.text())[:300].split())
                        if resp.status in (400, 422):
                            if len(prompts) == 1:
                                return [Generation([], "", f"server rejected the prompt ({resp.status}): {detail}")]
                            break  # which one: each alone, below (its room given back first)
                        if resp.status in FATAL:
                            raise ServerFailed(f"synthesize: {url} answered {resp.status}: {detail}")
                        last = f"{resp.status}: {detail}"
                        if resp.status not in RETRY:
                            raise ServerFailed(f"synthesize: {url} answered {last}")
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"  # unreachable, or the answer cut off: retried
            else:
                await self._gone(last)
                raise ServerFailed(f"synthesize: {url} failed {self.retries + 1} times; last: {last}")
        finally:
            async with self._room:
                self._free += len(prompts)
                self._room.notify_all()
        alone = await asyncio.gather(*(self._request([p], max_new_tokens) for p in prompts))
        return [g for (g,) in alone]

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

    def _generations(self, data: dict[str, Any], prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise ServerFailed(f"synthesize: the server answered {len(choices)} choices for {len(prompts)} prompts")
        usage = data.get("usage") or {}
        sent = sum(len(p) for p in prompts)
        if usage.get("prompt_tokens", sent) != sent:
            raise ServerFailed(
                f"synthesize: the server counted {usage['prompt_tokens']} prompt tokens for the {sent} ids"
                " sent: it does not take token-id prompts as they are"
            )
        self.usage.update({k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")})
        self.usage["requests"] += 1
        self.usage["prompts"] += len(prompts)
        out = []
        for choice in choices:
            ids = list(choice.get("token_ids") or [])
            if len(ids) > max_new_tokens:
                raise ServerFailed(
                    f"synthesize: the server generated {len(ids)} tokens for max_tokens {max_new_tokens}"
                )
            if ids and self.eos is not None and ids[-1] == self.eos:
                ids.pop()
            out.append(Generation(ids, choice.get("text", ""), None, choice.get("finish_reason")))
        return out


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
    prompts_per_request: int = 1,
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
        prompts_per_request=prompts_per_request,
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
