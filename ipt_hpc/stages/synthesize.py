"""The ``synthesize`` stage: raw shards -> one record per document with instruction-response pairs.

Per shard (see :mod:`ipt_hpc.stages.synth_format` for the protocol): the documents' context segments are
tokenized with the synthesizer's own tokenizer (batched, in a background thread), split into M rounds,
and streamed through the engine (:class:`Scheduler`); records are written in document order and
flushed every ``chunk_docs``, so a preempted or killed task resumes after its last durable record.
Each record keeps its parsed pairs, from which the chains of later rounds are rebuilt exactly on resume:
the final shard is byte-identical to an uninterrupted run (given deterministic generation).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from ..config import Config, ServerConfig
from ..errors import IptError
from ..execution import ShardContext
from ..execution.stage import Stage
from ..layout import RunLayout
from ..records import read_records
from . import synth_format as fmt
from .mixture import converted
from .synth_engines import Generation, get_engine, model_positions
from .synth_format import Entry, Slot, advance, build_prompt, parse_pairs, rounds_of, stats_histogram


class SynthJob(BaseModel):
    """What a synthesize task needs (JSON-serialisable; hashed into the stage's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    backend: Literal["transformers", "vllm", "server"]
    server: ServerConfig
    rounds: int
    max_new_tokens: int
    max_model_len: int
    too_long: Literal["truncate", "skip"]
    pair_rules: Literal["reference", "strict"]
    chunk_docs: int
    max_in_flight: int | None
    batch_size: int
    keep_raw: bool
    device: str
    dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    vllm_args: dict[str, bool | int | float | str]
    convert_share: float
    select_seed: int
    no_repeat_ngram_size: int
    repetition_penalty: float

    # where the server is and how hard the client tries: not what it generates (a shared server restarted on
    # another node, with another URL, resumes the same stage folder)
    CONNECTION: ClassVar[frozenset[str]] = frozenset(
        {"url", "timeout_s", "retries", "concurrency", "prompts_per_request", "startup_timeout_s"}
    )

    def identity(self) -> dict[str, Any]:
        """The fields that decide the records (the stage folder's config hash). Other backends leave the server
        section out altogether: their stage folders keep the hash they had before it existed."""
        server: Any = set(self.CONNECTION) if self.backend == "server" else True
        return self.model_dump(mode="json", exclude={"server": server})


def _engine(job: SynthJob, log_dir: Path) -> Any:
    if job.backend == "server":
        from .synth_server import DEFAULT_CONCURRENCY, connect

        server = job.server
        return get_engine(
            "server",
            job.model,
            factory=connect,
            url=server.url,
            served_model=server.served_model or job.model,
            max_model_len=job.max_model_len,
            concurrency=server.concurrency or job.max_in_flight or DEFAULT_CONCURRENCY,
            timeout_s=server.timeout_s,
            retries=server.retries,
            launch=launch_command(job) if server.launch else None,
            startup_timeout_s=server.startup_timeout_s,
            prompts_per_request=server.prompts_per_request,
            log_dir=str(log_dir) if server.launch else None,  # url mode: one engine for every stage folder
            repetition_penalty=job.repetition_penalty,
        )

    if job.backend == "vllm":
        return get_engine(
            "vllm",
            job.model,
            max_model_len=job.max_model_len,
            tensor_parallel_size=job.tensor_parallel_size,
            gpu_memory_utilization=job.gpu_memory_utilization,
            repetition_penalty=job.repetition_penalty,
            dtype=job.dtype,
            engine_args=tuple(sorted(job.vllm_args.items())),
        )
    return get_engine(
        "transformers",
        job.model,
        device=job.device,
        dtype=job.dtype,
        batch_size=job.batch_size,
        no_repeat_ngram_size=job.no_repeat_ngram_size,
        repetition_penalty=job.repetition_penalty,
    )


def launch_command(job: SynthJob) -> tuple[str, ...]:
    """``synth.server.launch``: the server module's arguments for the run's model and limits (python, the port
    and the host are the launcher's). ``synth.vllm_args`` become flags, as they are engine arguments in both."""
    server = job.server
    args = [
        "-m",
        server.module,
        "--model",
        job.model,
        "--served-model-name",
        server.served_model or job.model,
        "--max-model-len",
        str(min(job.max_model_len, model_positions(job.model) or job.max_model_len)),
        "--dtype",
        job.dtype,
        "--tensor-parallel-size",
        str(job.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(job.gpu_memory_utilization),
        "--generation-config",
        "vllm",
        "--disable-uvicorn-access-log",  # a log line per request: slower, and huge over a real shard
    ]
    for key, value in sorted(job.vllm_args.items()):
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return tuple(args)


class PieceTokenizer:
    """Ids of the pieces of a prompt that lie between two special tokens (a context segment, or an
    earlier entry's context and pairs), each exactly as tokenizing the whole prompt string gives it.

    A tokenizer splits a string at its special tokens and tokenizes each piece on its own, and a piece
    that follows a special token can tokenize differently from the same text at the start of a string
    (SentencePiece's leading ``▁``). Every piece of a prompt follows BOS or EOS, so a piece is tokenized
    as ``<s>`` + piece and the BOS id dropped. A copy of the Rust tokenizer of a fast tokenizer is used
    (the engine decodes with the original meanwhile); others go through ``tokenizer(...)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.bos = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.rust = None
        if backend is not None:
            from tokenizers import Tokenizer

            self.rust = Tokenizer.from_str(backend.to_str())
            self.rust.no_padding()
            self.rust.no_truncation()
            self.bos_text = self.bos_text or self.rust.id_to_token(self.bos)
        else:
            self.slow = tokenizer
        if self.bos is None or not self.bos_text:
            raise IptError("synthesize: the synthesizer's tokenizer has no BOS token")

    def encode(self, pieces: list[str]) -> list[list[int]]:
        texts = [self.bos_text + p for p in pieces]
        if self.rust is not None:  # no offsets needed: the faster batch call, no Python-side conversion
            out = [e.ids for e in self.rust.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            out = self.slow(texts, add_special_tokens=False)["input_ids"]
        for ids in out:
            if not ids or ids[0] != self.bos:
                raise IptError(
                    f"synthesize: the tokenizer does not read {self.bos_text!r} as its BOS token (id {self.bos}):"
                    " prompts could not be tokenized as the synthesizer's format expects"
                )
        return [ids[1:] for ids in out]

    def cut_points(self, text: str) -> list[int]:
        """Character offsets at which ``text``'s tokens end (where it can be cut on a token edge)."""
        if self.rust is not None:
            return [end for _, end in self.rust.encode(text, add_special_tokens=False).offsets]
        return list(range(1, len(text) + 1))  # no offsets: every character


def context_ids(
    pieces: PieceTokenizer, texts: list[str], room: int, too_long: str = "truncate"
) -> tuple[list[list[int] | None], list[str], int]:
    """Context segment ids per document (`` <CON> {text} </CON>\\n\\n`` as one piece), at most ``room``.

    Returns the ids (None for a document over ``room`` when ``too_long`` is ``skip``), the text each
    segment holds (with ``truncate`` a document over the budget is cut on a token edge, then its segment
    tokenized again so its ids stay exact) and the number of documents over the budget.
    """
    if room <= len(pieces.encode([fmt.context_text("")])[0]):
        raise IptError(
            f"a budget of {room} tokens per context segment (synth.max_model_len - synth.max_new_tokens - 1)"
            " leaves no room for a document: raise synth.max_model_len or lower synth.max_new_tokens"
        )
    ids: list[list[int] | None] = list(pieces.encode([fmt.context_text(t) for t in texts]))
    used = list(texts)
    cut = 0
    for d, seg in enumerate(ids):
        if seg is not None and len(seg) > room:
            cut += 1
            if too_long == "skip":
                ids[d] = None
            else:
                ids[d], used[d] = cut_to_budget(pieces, texts[d], room)
    return ids, used, cut


def context_room(job: SynthJob) -> int:
    """Tokens a context segment may take: the budget less the answer and the prompt's BOS."""
    room = job.max_model_len - job.max_new_tokens - 1
    if room <= 0:
        raise IptError(f"synth.max_model_len={job.max_model_len} leaves no room for a document")
    return room


def cut_to_budget(pieces: PieceTokenizer, text: str, room: int) -> tuple[list[int], str]:
    """The longest prefix of ``text``, cut on a token edge, whose context segment fits in ``room``."""
    ends = pieces.cut_points(text)
    overhead = len(pieces.encode([fmt.context_text("")])[0])
    k = min(len(ends), max(0, room - overhead))
    while True:
        part = text[: ends[k - 1]] if k else ""
        seg = pieces.encode([fmt.context_text(part)])[0]
        if len(seg) <= room:
            return seg, part
        k = max(0, k - max(1, len(seg) - room))


class ContextIds:
    """Context ids of a shard's documents, tokenized block by block in a background thread.

    Blocks are tokenized in document order, the order in which prompts are submitted, so the engine
    starts after the first block instead of the whole shard, and the rest of the tokenizing overlaps
    generation (the Rust tokenizer releases the GIL). The ids are identical to one eager call.
    """

    def __init__(self, tokenizer: Any, texts: list[str], job: SynthJob, block: int) -> None:
        self.block = max(1, block)
        self.pieces = PieceTokenizer(tokenizer)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="synth-tokenize")
        self._blocks = [
            self._pool.submit(context_ids, self.pieces, texts[i : i + self.block], context_room(job), job.too_long)
            for i in range(0, len(texts), self.block)
        ]
        self.wait_s = 0.0  # time the generation loop waited for ids (CPU side on the critical path)

    def _block(self, d: int) -> tuple[list[list[int] | None], list[str], int]:
        fut = self._blocks[d // self.block]
        if not fut.done():
            t = time.perf_counter()
            fut.result()
            self.wait_s += time.perf_counter() - t
        return fut.result()

    def __getitem__(self, d: int) -> list[int] | None:
        return self._block(d)[0][d % self.block]

    def context(self, d: int) -> str:
        """The text document ``d``'s segment holds (cut short when it was over the budget)."""
        return self._block(d)[1][d % self.block]

    def over_budget(self) -> int:
        return sum(f.result()[2] for f in self._blocks)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def synthesize_shard(job: SynthJob, ctx: ShardContext) -> dict[str, Any]:
    """Synthesize one shard (a task of the execution layer)."""
    t0 = time.perf_counter()
    docs, not_converted = [], 0
    for doc in read_records(ctx.input_path):
        if converted(doc["id"], job.convert_share, job.select_seed):
            docs.append(doc)
        else:
            not_converted += 1  # left to the raw group (templify)
    loading = time.perf_counter()
    engine = _engine(job, ctx.log_dir)  # loaded once per process: later shards of a task find it loaded
    load_s = time.perf_counter() - loading
    tok = engine.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is None or eos is None:
        raise IptError(f"synthesizer tokenizer of {job.model} lacks a BOS or EOS token")
    writer = ctx.open_output()
    ids = ContextIds(tok, [d["text"] for d in docs], job, job.chunk_docs)
    usage = Counter(getattr(engine, "usage", {}))  # a server's token counts: this shard's are the difference
    try:
        stats = _generate(job, ctx, engine, docs, ids, writer, t0, not_converted)
    finally:
        ids.close()
    stats.update(load_s=round(load_s, 3), engine_batch=engine.batch())
    if job.backend == "server":  # what the server said it did for this attempt's requests
        stats["server"] = {**engine.info, "url": engine.url, "usage": dict(Counter(engine.usage) - usage)}
    return stats


def _generate(
    job: SynthJob,
    ctx: ShardContext,
    engine: Any,
    docs: list[dict[str, Any]],
    ids: ContextIds,
    writer: Any,
    t0: float,
    not_converted: int,
) -> dict[str, Any]:
    """The rounds of one shard, streamed through the engine (see :class:`Scheduler`)."""
    sched = Scheduler(job, engine, docs, ids)
    sched.rebuild(writer.written() if writer.records else iter(()), writer.records)
    since_flush = 0
    try:
        for rec in sched.records(window=_window(job, engine)):
            writer.write(rec)
            since_flush += 1
            if since_flush >= job.chunk_docs:  # durable every chunk_docs records
                writer.flush()
                ctx.report(writer.records)
                since_flush = 0
    except BaseException:
        engine.cancel()  # a pack's next shard must not receive this one's results
        raise
    stats = writer.close().to_json()
    seconds = time.perf_counter() - t0
    stats.update(shard_stats(ctx.output_path, ids.over_budget(), ids.wait_s, sched.wait_s, seconds))
    stats["generate_s"] = round(sched.loop_s, 3)
    if sched.loop_s:
        stats["gen_tokens_per_s"] = round(stats["tokens"] / sched.loop_s, 1)
    return {**stats, "not_converted": not_converted}


def _window(job: SynthJob, engine: Any) -> int:
    """Documents between the oldest not yet written and the newest submitted: the engine's own bound
    (what keeps it saturated), or ``synth.max_in_flight`` when smaller."""
    bound = engine.capacity()
    return max(1, min(bound, job.max_in_flight) if job.max_in_flight else bound)


class Scheduler:
    """Feeds a shard's prompts to a streaming engine as soon as they can be built, and yields the records
    in document order.

    Rounds are contiguous ranges of documents and slot ``i`` of a round chains onto slot ``i`` of the
    rounds before it, so a document's prompt can be built as soon as its predecessor in the slot has its
    generation, whatever round the other documents are in. Documents are admitted in order while fewer
    than ``window`` lie between the oldest unwritten one and the newest submitted (that bounds both the
    requests in flight and the finished ones waiting for an earlier document), and records come out in
    document order, so the file, and a resume from it, are exactly those of generating round by round.
    """

    def __init__(self, job: SynthJob, engine: Any, docs: list[dict[str, Any]], ids: ContextIds) -> None:
        self.job, self.engine, self.docs, self.ids = job, engine, docs, ids
        tok = engine.tokenizer
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.pieces = PieceTokenizer(tok)  # its own copy: the tokenizing thread uses the other
        self.place = {d: (r, i) for r, rnd in enumerate(rounds_of(len(docs), job.rounds)) for i, d in enumerate(rnd)}
        self.docs_at = {at: d for d, at in self.place.items()}
        self.slots: dict[int, Slot] = {}
        self.rounds_in_slot: Counter[int] = Counter()  # entries advanced into each slot so far
        self.start = 0
        self.wait_s = 0.0  # time the stage waited on the engine
        self.loop_s = 0.0

    def rebuild(self, written: Any, count: int) -> None:
        """Replay the durable records (the same decisions as the uninterrupted run)."""
        done = [(d, rec["pairs"], rec["chain_docs"]) for d, rec in zip(range(count), written, strict=False)]
        self._advance_all(done)
        self.start = count

    def _advance_all(self, done: list[tuple[int, list[dict[str, str]], list[int]]]) -> None:
        """Documents ``(d, pairs, chained)`` have their pairs: each slot's chain goes on with its document (as
        an example of its context and parsed pairs) or, without pairs, ends; in the order given (a resume replays
        document order; an engine's result set holds at most one document per slot, as a slot's next document
        waits for its predecessor). Their examples are tokenized in one call, off the per-document path: only an
        entry that a later document chains onto is one."""
        want = [k for k, (d, pairs, _) in enumerate(done) if pairs and self._chained_onto(d)]
        texts = [fmt.example_text(self.ids.context(done[k][0]), done[k][1]) for k in want]
        examples = dict(zip(want, self.pieces.encode(texts), strict=True)) if want else {}
        for k, (d, pairs, chained) in enumerate(done):
            i = self.place[d][1]
            entry = Entry(d, self.ids[d] or [], examples.get(k), len(pairs))
            advance(self.slots.setdefault(i, Slot()), entry, chained)
            self.rounds_in_slot[i] += 1

    def _chained_onto(self, d: int) -> bool:
        r, i = self.place[d]
        return (r + 1, i) in self.docs_at

    def records(self, window: int) -> Any:
        job, engine = self.job, self.engine
        n = len(self.docs)
        nxt = out = self.start
        plans: dict[int, tuple[list[int], list[int]]] = {}
        ready: dict[int, dict[str, Any]] = {}
        started = time.perf_counter()
        while out < n:
            while nxt < n and nxt - out < window:  # admit in document order
                r, i = self.place[nxt]
                if self.rounds_in_slot[i] < r:
                    break  # its predecessor in the slot is still being generated
                if self.ids[nxt] is None:
                    prompt, chained = [], []
                else:
                    prompt, chained = build_prompt(
                        self.slots.setdefault(i, Slot()),
                        Entry(nxt, self.ids[nxt]),
                        bos=self.bos,
                        eos=self.eos,
                        max_model_len=job.max_model_len,
                        max_new_tokens=job.max_new_tokens,
                    )
                plans[nxt] = (prompt, chained)
                if prompt:
                    engine.submit(nxt, prompt, job.max_new_tokens)
                else:
                    skipped = Generation([], "", "skipped: longer than the token budget")
                    ready.update(self._finish([(nxt, [], [], skipped)]))
                nxt += 1
            if out not in ready:
                t = time.perf_counter()
                finished = engine.collect()
                self.wait_s += time.perf_counter() - t
                if not finished:
                    raise IptError(f"synthesize: the engine returned nothing with {nxt - out} documents in flight")
                ready.update(self._finish([(d, *plans[d], gen) for d, gen in finished]))
            while out in ready:
                del plans[out]
                yield ready.pop(out)
                out += 1
        self.loop_s = time.perf_counter() - started

    def _finish(self, results: list[tuple[int, list[int], list[int], Generation]]) -> dict[int, dict[str, Any]]:
        """The records of a result set ``(d, prompt, chained, generation)``; their slots advance, so their
        successors can be admitted."""
        rules = self.job.pair_rules
        parsed = [parse_pairs(gen.text, rules) if gen.error is None else ([], Counter()) for *_, gen in results]
        self._advance_all([(d, pairs, chained) for (d, _, chained, _), (pairs, _) in zip(results, parsed, strict=True)])
        out = {}
        for (d, prompt, chained, gen), (pairs, dropped) in zip(results, parsed, strict=True):
            rec = {
                **synth_record(self.docs, d, self.place[d], chained, pairs),
                "dropped": dict(dropped),
                "prompt_tokens": len(prompt),
                "gen_tokens": len(gen.ids),
                "gen_ids": gen.ids,
                "finish_reason": gen.finish_reason,
                "error": gen.error,
            }
            if self.job.keep_raw:
                rec["raw"] = gen.text
            out[d] = rec
        return out


def synth_record(
    docs: list[dict[str, Any]], d: int, place: tuple[int, int], chained: list[int], pairs: list[dict[str, str]]
) -> dict[str, Any]:
    """The fields a synthesized record starts with, in this order (the records' bytes follow it): document
    ``d``, its (round, slot), the documents its prompt chained and its parsed pairs."""
    r, i = place
    return {
        "id": docs[d]["id"],
        "text": docs[d]["text"],
        "round": r,
        "slot": i,
        "chain": [docs[j]["id"] for j in chained],
        "chain_docs": chained,
        "pairs": pairs,
    }


def shard_stats(path: Path, over_budget: int, wait_s: float, engine_s: float, total_s: float) -> dict[str, Any]:
    pairs, dropped, finished, errors = [], Counter(), Counter(), 0
    prompt_tokens = gen_tokens = 0
    for rec in read_records(path):
        pairs.append(len(rec["pairs"]))
        dropped.update(rec["dropped"])
        errors += rec["error"] is not None
        finished[rec.get("finish_reason") or "error"] += 1  # (records of before the field: "error")
        prompt_tokens += rec["prompt_tokens"]
        gen_tokens += rec["gen_tokens"]
    return {
        "docs": len(pairs),
        "pairs": sum(pairs),
        "pairs_per_doc": stats_histogram(pairs),
        "docs_without_pairs": sum(1 for p in pairs if p == 0),
        "dropped": dict(dropped),
        "errors": errors,
        "finish_reasons": dict(sorted(finished.items())),  # stop (EOS), length (max_new_tokens), error
        "over_budget": over_budget,  # truncated or skipped, per synth.too_long
        "prompt_tokens": prompt_tokens,
        "tokens": gen_tokens,
        "gen_tokens_per_s": round(gen_tokens / engine_s, 1) if engine_s else None,
        "engine_wait_s": round(engine_s, 3),  # the stage waited this long for the engine's results
        "cpu_side_share": round(1 - engine_s / total_s, 3) if total_s else None,
        "tokenize_wait_s": round(wait_s, 3),  # the engine waited this long for prompt ids (not overlapped)
    }


def synth_job(cfg: Config, layout: RunLayout | None) -> SynthJob:
    """The stage's job: ``synth.*`` with the model known to be set and the backend's options checked."""
    s = cfg.synth
    if not s.model:
        raise IptError("synthesize: no synthesizer model (--model PATH_OR_NAME or synth.model)")
    job = SynthJob(**s.model_dump(exclude={"input_stage"}))  # the same fields (the input: the StageRun's), model set
    if job.backend == "server" and not (job.server.url or job.server.launch):
        raise IptError(
            "synth.backend=server needs synth.server.url (http://host:port of an OpenAI-compatible server)"
            " or synth.server.launch: true (each task starts vLLM's server)"
        )
    if job.backend == "vllm" and job.no_repeat_ngram_size:
        raise IptError(
            "synth.no_repeat_ngram_size is a transformers-backend option; with vllm use synth.repetition_penalty"
        )
    return job


STAGE = Stage(
    name="synthesize",
    upstream="the shard stage",
    input=lambda cfg, layout: layout.stage(cfg.synth.input_stage),
    output=lambda cfg, layout: layout.synth,
    shard_fn=synthesize_shard,
    job=synth_job,
)
