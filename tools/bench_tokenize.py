"""Benchmark the ``tokenize`` stage against the tokenizer's own limit, datatrove and Megatron-LM.

Usage (with the project's venv python, e.g. ``.venv/bin/python``)::

    python tools/bench_tokenize.py --mb 100
    PYTHONPATH=/tmp/pydeps python tools/bench_tokenize.py --mb 100 --repeat 3 --tokenizer /tmp/mistral-7b-v0.1 \\
        --datatrove-python /tmp/venv-dt/bin/python --megatron-lm /tmp/megatron-lm

One input (``--mb`` MB of text), one tokenizer, ``--cores`` cores; every variant prints wall time,
MB/s, docs/s and tokens/s side by side (MB = 10**6 UTF-8 bytes of the documents' text, not of JSONL):

1. ``ipt_hpc``: the real stage end to end. The input is a finished run stage folder (``raw/``) of
   ``--shards`` zstd JSONL shards written with :class:`ipt_hpc.records.RecordWriter`; the timed call
   is ``run_stage(ipt_hpc.stages.tokenize.STAGE, cfg, run)`` with ``execution.backend=debug`` and
   ``tokenize.workers=--cores``: tokenizer load and copy, worker start, reading, tokenizing, writing
   per-shard ``.bin/.idx`` and merging them into ``tokens/raw.{bin,idx}``.
2. ``limit``: ``--cores`` fresh (spawned) single-threaded processes, each running
   ``encode_batch_fast`` (``add_special_tokens=False``, batches of 1024) over its contiguous share
   (by bytes) of the texts, handed to it before the clock starts; timed from a barrier after the
   tokenizer is loaded until the last share is done: the tokenizer's own throughput, no I/O, no
   IPC. (An in-process multi-threaded ``encode_batch`` is not the limit: its Python-side loop
   serialises.) Its token count (plus the BOS/EOD ipt_hpc adds per document) must equal
   ipt_hpc's, and the first documents of ipt_hpc's dataset are checked id for id against a fresh
   encoding.
3. ``datatrove``: ``JsonlReader(compression="zstd")`` over the same shards + ``DocumentTokenizer``
   (EOS appended by its post-processor, ``shuffle_documents=False`` since ipt_hpc does not shuffle)
   under ``LocalPipelineExecutor(tasks=cores, workers=cores)``, writing its own ``.ds`` format. Run
   in a subprocess with ``--datatrove-python`` (default: this interpreter when it can import
   datatrove); the time is ``executor.run()`` measured inside it (imports excluded).
4. ``preprocess_data``: Megatron-LM's ``tools/preprocess_data.py`` from the checkout given by
   ``--megatron-lm``, run with ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <the saved
   tokenizer folder> --workers <cores> --append-eod``. Tag ``core_v0.16.1`` runs on Python 3.11 with
   megatron-core 0.16.1 once ``six`` and ``triton`` import (``megatron.training`` imports triton even
   on CPU): e.g. ``pip install --no-deps --target /tmp/pydeps six triton`` and
   ``PYTHONPATH=/tmp/pydeps``. It reads plain JSONL (the same records, uncompressed; writing that
   file is not timed). The time is the subprocess wall time minus its start-up (interpreter +
   torch/megatron imports, measured with ``--help`` and printed).

The text is real English prose found on the machine, nothing downloaded: paragraphs of the files
under /usr/share/common-licenses and /usr/share/doc (txt, md, rst, README/NEWS/copyright, gzipped
or not), of text files and package METADATA in this interpreter's site-packages and stdlib, and
the docstrings of a fixed list of stdlib modules; prose-looking paragraphs (mostly words) are kept,
deduplicated, shuffled with ``--seed`` and joined into 1-5 KB documents; the set is repeated (each
pass reshuffled) until it reaches ``--mb``. The unique size and a digest are printed: the data
depends on what is installed.

``--tokenizer bpe32k`` (default) trains a 32k byte-level BPE (GPT-2 style, ``<|endoftext|>`` as
EOS, no BOS) with ``tokenizers`` on ``--train-mb`` of the unique text. ``--tokenizer PATH`` takes a
Hugging Face tokenizer folder (``tokenizer.json``, or a SentencePiece ``tokenizer.model`` that
transformers converts when ``sentencepiece`` is installed). A real pretrained one ships in PyPI's
``mistral-common`` wheel (``mistral_common/data/tokenizer.model.v1``, the Mistral-7B-v0.1 SentencePiece
model); see docs/benchmarks.md for turning it into a folder. The tokenizer is saved once
(``save_pretrained``) and every variant loads that folder.

Each repeat runs every variant once (order rotated per repeat); the table shows the best of
``--repeat``. The scratch directory (under ``--dir``) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib
import inspect
import multiprocessing
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_records import DOC_MODULES  # the same stdlib modules' docstrings as the records benchmark

MB = 1e6
TARGET_LIMIT = 0.90  # ipt_hpc throughput / limit throughput
TARGET_DATATROVE = 1.05  # ipt_hpc throughput / datatrove throughput
TARGET_MEGATRON = 2.0  # ipt_hpc throughput / preprocess_data throughput
CHECK_DOCS = 200  # documents of ipt_hpc's output compared id for id with a fresh encoding

PROSE_NAME = re.compile(r"(readme|news|changes|changelog|copyright|license|authors|history|faq|notes?)", re.I)
PROSE_SUFFIXES = {".txt", ".md", ".rst"}
PARA_SPLIT = re.compile(r"\n[ \t]*\n")


# -- corpus ----------------------------------------------------------------------------------
def _text_files() -> Iterator[Path]:
    """Files likely to hold English prose, in a deterministic order."""
    paths = sysconfig.get_paths()
    roots = [Path("/usr/share/common-licenses"), Path("/usr/share/doc"), Path(paths["purelib"]), Path(paths["stdlib"])]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                base = name.removesuffix(".gz")
                suffix = Path(base).suffix.lower()
                if (
                    root.name == "common-licenses"
                    or suffix in PROSE_SUFFIXES
                    or base == "METADATA"
                    or (not suffix and PROSE_NAME.match(base))
                ):
                    yield Path(dirpath) / name


def _docstrings() -> Iterator[str]:
    for name in DOC_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional module missing here only shrinks the corpus
            continue
        objs: list[Any] = [module]
        for attr, obj in inspect.getmembers(module):
            if attr.startswith("_") or inspect.ismodule(obj):  # submodule attributes depend on earlier imports
                continue
            objs.append(obj)
            if inspect.isclass(obj):
                objs.extend(member for key, member in inspect.getmembers(obj) if not key.startswith("_"))
        for obj in objs:
            owner = getattr(obj, "__module__", None)
            if isinstance(owner, str) and owner.split(".")[0] not in sys.stdlib_module_names:
                continue  # patched in by a package imported before (transformers adds Logger methods)
            with contextlib.suppress(Exception):
                doc = inspect.getdoc(obj)
                if doc:
                    yield doc


def _is_prose(para: str) -> bool:
    """Mostly words: letters dominate the non-space characters, few tables or code-like tokens."""
    n = len(para)
    if n < 200 or para.count("  ") > 0.03 * n:
        return False
    letters = sum(c.isalpha() for c in para)
    nonspace = n - sum(c.isspace() for c in para)
    words = para.split()
    if letters < 0.85 * nonspace or len(words) < 30 or letters > 9 * len(words):
        return False
    wordlike = sum(w.strip(".,;:!?()\"'`*").isalpha() for w in words)
    return wordlike >= 0.85 * len(words)


def prose_paragraphs() -> tuple[list[str], dict[str, int]]:
    """Unique prose paragraphs found on this machine, and the bytes each source gave."""
    seen: set[bytes] = set()
    out: list[str] = []
    by_source = {"/usr/share/common-licenses": 0, "/usr/share/doc": 0, "python packages+stdlib": 0, "docstrings": 0}

    def add(text: str, source: str) -> None:
        for para in PARA_SPLIT.split(text):
            para = para.strip()
            if not _is_prose(para):
                continue
            key = hashlib.blake2b(para.encode(), digest_size=12).digest()
            if key not in seen:
                seen.add(key)
                out.append(para)
                by_source[source] += len(para.encode())

    for path in _text_files():
        try:
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            text = data.decode("utf-8")
        except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
            continue
        s = str(path)
        source = next((k for k in by_source if s.startswith(k)), "python packages+stdlib")
        add(text, source)
    for doc in _docstrings():
        add(doc, "docstrings")
    return out, by_source


def make_documents(paragraphs: list[str], target_bytes: int, seed: int) -> tuple[list[str], int]:
    """Documents of 1-5 KB of whole paragraphs; the set is repeated (reshuffled) up to ``target_bytes``.

    Returns the documents and how many of them the first (unique) pass made.
    """
    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    unique = 0
    while total < target_bytes:
        order = paragraphs[:]
        rng.shuffle(order)
        doc: list[str] = []
        size, want = 0, rng.randint(1000, 5000)
        for para in order:
            doc.append(para)
            size += len(para.encode()) + 2
            if size >= want:
                text = "\n\n".join(doc)
                docs.append(text)
                total += len(text.encode())
                doc, size, want = [], 0, rng.randint(1000, 5000)
                if total >= target_bytes:
                    break
        if not unique:
            unique = len(docs)
    return docs, unique


# -- tokenizer -------------------------------------------------------------------------------
def train_bpe(paragraphs: list[str], train_bytes: int, seed: int, dest: Path) -> str:
    """A 32k byte-level BPE (GPT-2 style: no BOS, ``<|endoftext|>`` as EOS) saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = paragraphs[:]
    random.Random(seed + 1).shuffle(sample)
    picked, size = [], 0
    for para in sample:
        if size >= train_bytes:
            break
        picked.append(para)
        size += len(para.encode())
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(picked, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(dest))
    return f"32k byte-level BPE trained here on {size / MB:.1f} MB of the text (vocab {len(fast)})"


def load_tokenizer(spec: str, paragraphs: list[str], args: argparse.Namespace, dest: Path) -> str:
    if spec == "bpe32k":
        return train_bpe(paragraphs, int(args.train_mb * MB), args.seed, dest)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    if not getattr(tok, "is_fast", False):
        raise SystemExit(f"{spec}: no fast tokenizer (install sentencepiece to convert a tokenizer.model)")
    tok.save_pretrained(str(dest))
    return f"{spec} ({type(tok).__name__}, vocab {len(tok)})"


# -- context ---------------------------------------------------------------------------------
@dataclass
class Ctx:
    args: argparse.Namespace
    root: Path
    texts: list[str]
    text_bytes: int
    tok_dir: Path  # the saved folder every variant loads
    bos: int | None
    eod: int | None
    eos_token: str
    run_dir: Path
    jsonl: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    seconds: float
    docs: int
    tokens: int


@dataclass
class Variant:
    name: str
    fn: Callable[[Ctx], Result]
    results: list[Result] = field(default_factory=list)

    @property
    def best(self) -> Result:
        return min(self.results, key=lambda r: r.seconds)


def write_input(ctx: Ctx, shards: int) -> None:
    """The input stage folder: ``shards`` zstd JSONL files written as a finished stage would be."""
    from ipt_hpc.execution import StageState, shard_name
    from ipt_hpc.records import RecordWriter

    stage = ctx.run_dir / "raw"
    state = StageState(stage)
    state.write_stage({"stage": "raw", "num_shards": shards, "config_hash": "bench"})
    per = -(-len(ctx.texts) // shards)
    for k in range(shards):
        name = shard_name(k, shards)
        part = ctx.texts[k * per : (k + 1) * per]
        with RecordWriter(stage / name) as w:
            w.write_many({"id": f"doc-{k * per + i}", "text": t} for i, t in enumerate(part))
        state.mark_done(name, {"records": len(part)})


# -- (1) ipt_hpc -----------------------------------------------------------------------------
def run_ipt(ctx: Ctx) -> Result:
    from ipt_hpc.config import load_config
    from ipt_hpc.execution import run_stage
    from ipt_hpc.stages import tokenize

    shutil.rmtree(ctx.run_dir / "tokens", ignore_errors=True)
    sets: dict[str, Any] = {
        "tokenize.tokenizer": str(ctx.tok_dir),
        "tokenize.input_stage": "raw",
        "tokenize.workers": ctx.args.cores,
        "execution.backend": "debug",
    }
    if ctx.args.batch_docs:
        sets["tokenize.batch_docs"] = ctx.args.batch_docs
    cfg = load_config(None, None, sets)
    tokenize._close_pools()  # start cold: worker start-up is part of the stage
    start = time.perf_counter()
    result = run_stage(tokenize.STAGE, cfg, ctx.run_dir)
    seconds = time.perf_counter() - start
    tokenize._close_pools()
    merged = result["manifest"]
    return Result(seconds, merged["documents"], merged["tokens"])


def check_ipt(ctx: Ctx) -> None:
    """ipt_hpc's merged dataset: one document per text, the first ones id for id as the tokenizer says."""
    import numpy as np
    from tokenizers import Tokenizer

    from ipt_hpc.indexed import paths, read_index

    prefix = ctx.run_dir / "tokens" / "raw"
    dtype, lengths, pointers, _ = read_index(paths(prefix)[1])
    if len(lengths) != len(ctx.texts):
        raise SystemExit(f"FAILED: ipt_hpc wrote {len(lengths)} documents for {len(ctx.texts)} texts")
    tok = Tokenizer.from_file(str(ctx.tok_dir / "tokenizer.json"))
    data = np.memmap(paths(prefix)[0], dtype=dtype, mode="r")
    head = [ctx.bos] if ctx.bos is not None else []
    tail = [ctx.eod] if ctx.eod is not None else []
    for i, enc in enumerate(tok.encode_batch_fast(ctx.texts[:CHECK_DOCS], add_special_tokens=False)):
        start = int(pointers[i]) // dtype.itemsize
        got = data[start : start + int(lengths[i])].tolist()
        if got != head + enc.ids + tail:
            raise SystemExit(f"FAILED: ipt_hpc document {i} differs from the tokenizer's own encoding")


# -- (2) the limit ---------------------------------------------------------------------------
def _limit_share(tok_json: str, texts: list[str], barrier: Any, conn: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_json)
    batch = 1024
    barrier.wait()
    tokens = 0
    for i in range(0, len(texts), batch):  # one batch's encodings alive at a time (two: ~8% slower)
        tokens += sum(len(e) for e in tok.encode_batch_fast(texts[i : i + batch], add_special_tokens=False))
    conn.send(tokens)
    conn.close()


def run_limit(ctx: Ctx) -> Result:
    cores = ctx.args.cores
    bounds, acc, k = [0], 0, 1
    for i, text in enumerate(ctx.texts):  # contiguous shares of about equal bytes
        acc += len(text.encode())
        if k < cores and acc >= ctx.text_bytes * k / cores:
            bounds.append(i + 1)
            k += 1
    bounds += [len(ctx.texts)] * (cores + 1 - len(bounds))
    # Fresh (spawned) processes, each handed its share before the clock starts: forked children of
    # this big parent were measured ~20% slower at the same work.
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(cores + 1)
    tok_json = str(ctx.tok_dir / "tokenizer.json")
    pipes, procs = [], []
    for k in range(cores):
        recv, send = mp.Pipe(duplex=False)
        share = ctx.texts[bounds[k] : bounds[k + 1]]
        proc = mp.Process(target=_limit_share, args=(tok_json, share, barrier, send))
        proc.start()
        send.close()
        pipes.append(recv)
        procs.append(proc)
    barrier.wait()
    start = time.perf_counter()
    tokens = sum(p.recv() for p in pipes)
    seconds = time.perf_counter() - start
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"FAILED: a limit process exited with {proc.exitcode}")
    extra = (ctx.bos is not None) + (ctx.eod is not None)
    return Result(seconds, len(ctx.texts), tokens + extra * len(ctx.texts))


# -- (3) datatrove ---------------------------------------------------------------------------
DATATROVE_SCRIPT = """
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer

if __name__ == "__main__":
    src, out, logs, tok, eos, cores = sys.argv[1:]
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(src, compression="zstd", glob_pattern="shard-*.jsonl.zst", text_key="text", id_key="id"),
            DocumentTokenizer(out, tokenizer_name_or_path=tok, eos_token=eos, shuffle_documents=False),
        ],
        tasks=int(cores),
        workers=int(cores),
        logging_dir=logs,
    )
    start = time.perf_counter()
    executor.run()
    print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def datatrove_python(args: argparse.Namespace) -> str | None:
    py = args.datatrove_python or sys.executable
    probe = [py, "-c", "import datatrove, importlib.metadata as m; print(m.version('datatrove'))"]
    proc = subprocess.run(probe, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_datatrove(ctx: Ctx) -> Result:
    import json

    import numpy as np

    work = ctx.root / "datatrove"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    script = work.parent / "datatrove_run.py"
    script.write_text(DATATROVE_SCRIPT)
    py = ctx.args.datatrove_python or sys.executable
    out, logs = work / "out", work / "logs"
    cmd = [py, str(script), str(ctx.run_dir / "raw"), str(out), str(logs), str(ctx.tok_dir / "tokenizer.json")]
    cmd += [ctx.eos_token, str(ctx.args.cores)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"FAILED: datatrove exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    docs = tokens = 0
    for index in sorted(out.glob("*.ds.index")):
        ends = np.fromfile(index, dtype="<u8")
        docs += len(ends)
        tokens += int(ends[-1]) if len(ends) else 0
    return Result(seconds, docs, tokens)


# -- (4) Megatron-LM preprocess_data ---------------------------------------------------------
def _megatron_cmd(ctx: Ctx, out: Path) -> tuple[list[str], dict[str, str]]:
    checkout = Path(ctx.args.megatron_lm).resolve()  # the script puts the checkout on sys.path itself
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input", str(ctx.jsonl)]
    cmd += ["--output-prefix", str(out), "--tokenizer-type", "HuggingFaceTokenizer"]
    cmd += ["--tokenizer-model", str(ctx.tok_dir), "--workers", str(ctx.args.cores), "--append-eod"]
    return cmd, env


def megatron_startup(ctx: Ctx) -> float:
    """Seconds preprocess_data.py takes to start (interpreter, torch and megatron imports): ``--help``."""
    cmd, env = _megatron_cmd(ctx, ctx.root / "unused")
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        proc = subprocess.run([*cmd[:2], "--help"], capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"FAILED: preprocess_data.py --help exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return best


def run_megatron(ctx: Ctx) -> Result:
    from ipt_hpc.indexed import read_index

    work = ctx.root / "megatron"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cmd, env = _megatron_cmd(ctx, work / "out")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start - ctx.args.megatron_startup
    if proc.returncode != 0:
        raise SystemExit(f"FAILED: preprocess_data.py exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    _, lengths, _, _ = read_index(work / "out_text_document.idx")
    return Result(seconds, len(lengths), int(lengths.sum(dtype="int64")))


# -- report ----------------------------------------------------------------------------------
def versions(args: argparse.Namespace, dt_version: str | None) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for name in ("ipt_hpc", "tokenizers", "transformers", "numpy", "orjson", "zstandard", "megatron-core"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{name} {version(name)}")
    if dt_version:
        parts.append(f"datatrove {dt_version} ({args.datatrove_python or sys.executable})")
    if args.megatron_lm:
        parts.append(f"Megatron-LM checkout {args.megatron_lm}")
    cpu = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    parts.append(f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs {cpu}".rstrip())
    return ", ".join(parts)


def report(vs: list[Variant], ctx: Ctx, args: argparse.Namespace) -> None:
    mb = ctx.text_bytes / MB
    limit = next(v for v in vs if v.name.startswith("limit")).best.seconds
    headers = ["variant", "seconds", "MB/s", "docs/s", "tokens/s", "tokens", "vs limit"]
    rows = []
    for v in vs:
        r = v.best
        rows.append(
            [
                v.name,
                f"{r.seconds:.1f}",
                f"{mb / r.seconds:.2f}",
                f"{r.docs / r.seconds:,.0f}",
                f"{r.tokens / r.seconds:,.0f}",
                f"{r.tokens:,}",
                f"{limit / r.seconds:.2f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    print(f"\ntokenize, {mb:,.1f} MB of text, {len(ctx.texts):,} documents, {args.cores} cores, best of {args.repeat}")
    print(line(headers))
    for row in rows:
        print(line(row))
    print("all times (s):")
    for v in vs:
        print(f"  {v.name:<24} " + " ".join(f"{r.seconds:.2f}" for r in v.results))
    for note in ctx.notes:
        print("note:", note)
    ours = vs[0].best.seconds

    def paired(v: Variant) -> str:
        """The ratio within each repeat (the variants of one repeat ran one after the other), which the
        machine's drift between repeats moves less than best against best."""
        ratios = sorted(r.seconds / o.seconds for r, o in zip(v.results, vs[0].results, strict=True))
        each = " ".join(f"{x:.2f}" for x in ratios)
        return f"; per repeat {each}, median {ratios[len(ratios) // 2]:.2f}x" if len(ratios) > 1 else ""

    checks = [("ipt_hpc >= 0.90x the limit", limit / ours, TARGET_LIMIT, paired(vs[1]))]
    for v in vs:
        if v.name.startswith("datatrove"):
            checks.append(("ipt_hpc >= 1.05x datatrove", v.best.seconds / ours, TARGET_DATATROVE, paired(v)))
        if v.name.startswith("preprocess_data"):
            startup = args.megatron_startup
            with_startup = f"; {(v.best.seconds + startup) / ours:.2f}x counting its {startup:.1f} s start-up"
            more = paired(v) + with_startup
            checks.append(("ipt_hpc >= 2x preprocess_data", v.best.seconds / ours, TARGET_MEGATRON, more))
    for label, ratio, target, more in checks:
        print(f"target {label}: {'MET' if ratio >= target else 'MISSED'} (best of each {ratio:.2f}x{more})")


# -- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="MB of text (UTF-8) to tokenize (default 100)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores for every variant")
    parser.add_argument("--tokenizer", default="bpe32k", help="bpe32k (train one here) or an HF tokenizer folder")
    parser.add_argument("--train-mb", type=float, default=10, help="text to train bpe32k on, MB (default 10)")
    parser.add_argument("--shards", type=int, default=8, help="input shards (default 8)")
    parser.add_argument("--batch-docs", type=int, default=None, help="tokenize.batch_docs (default: the config's)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the best is shown (default 1)")
    parser.add_argument("--seed", type=int, default=20240607, help="data seed")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    parser.add_argument("--skip-datatrove", action="store_true", help="leave out datatrove")
    parser.add_argument("--datatrove-python", default=None, help="interpreter that has datatrove (default: this one)")
    parser.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout: also run tools/preprocess_data.py")
    args = parser.parse_args(argv)
    if args.cores < 1 or args.shards < args.cores:
        parser.error("need --cores >= 1 and --shards >= --cores (datatrove gives each task whole files)")

    print("command:", shlex.join([sys.executable, *sys.argv]))
    dt_version = None
    if not args.skip_datatrove:
        dt_version = datatrove_python(args)
        if dt_version is None:
            print(f"datatrove: not importable by {args.datatrove_python or sys.executable}; skipped")
    print("versions:", versions(args, dt_version))
    sys.stdout.flush()

    root = Path(tempfile.mkdtemp(prefix="bench_tokenize-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        paragraphs, by_source = prose_paragraphs()
        unique_bytes = sum(by_source.values())
        texts, unique_docs = make_documents(paragraphs, int(args.mb * MB), args.seed)
        text_bytes = sum(len(t.encode()) for t in texts)
        digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
        sources = ", ".join(f"{k} {v / MB:.1f}" for k, v in by_source.items())
        print(
            f"text: {len(paragraphs):,} unique prose paragraphs, {unique_bytes / MB:.1f} MB ({sources} MB) -> "
            f"{len(texts):,} documents, {text_bytes / MB:.1f} MB ({unique_docs:,} documents per pass, "
            f"x{text_bytes / max(unique_bytes, 1):.1f}), sha256 {digest}"
        )
        tok_src = root / "tokenizer-src"
        described = load_tokenizer(args.tokenizer, paragraphs, args, tok_src)
        del paragraphs

        from transformers import AutoTokenizer

        from ipt_hpc.stages.tokenize import special_ids

        tok = AutoTokenizer.from_pretrained(str(tok_src))
        bos, eod = special_ids(tok, "auto", True)
        run_dir = root / "run"
        ctx = Ctx(args, root, texts, text_bytes, run_dir / "bench-tokenizer", bos, eod, tok.eos_token, run_dir)
        write_input(ctx, args.shards)
        ctx.tok_dir.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(ctx.tok_dir))  # the same folder for every variant
        tok_sets = f"BOS {'added' if bos is not None else 'none'}, EOD {tok.eos_token!r}"
        print(f"tokenizer: {described}; ipt_hpc adds {tok_sets}")
        variants = [Variant("ipt_hpc tokenize", run_ipt), Variant("limit (encode_batch_fast)", run_limit)]
        if dt_version:
            variants.append(Variant("datatrove", run_datatrove))
        if args.megatron_lm:
            import orjson

            ctx.jsonl = root / "input.jsonl"
            with open(ctx.jsonl, "wb") as fh:
                for i, t in enumerate(texts):
                    fh.write(orjson.dumps({"id": f"doc-{i}", "text": t}, option=orjson.OPT_APPEND_NEWLINE))
            args.megatron_startup = megatron_startup(ctx)
            ctx.notes.append(
                f"preprocess_data: reads plain JSONL; its time excludes {args.megatron_startup:.1f} s of start-up"
                " (python + torch/megatron imports, measured with --help)"
            )
            variants.append(Variant("preprocess_data", run_megatron))
        print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)

        for rep in range(args.repeat):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in order:
                r = v.fn(ctx)
                v.results.append(r)
                progress = f"  {v.name}: {r.seconds:.1f} s, {r.docs:,} docs, {r.tokens:,} tokens"
                print(progress, file=sys.stderr, flush=True)
                if v.fn is run_ipt and rep == 0:
                    check_ipt(ctx)
        ours, lim = variants[0].best, variants[1].best
        if (ours.docs, ours.tokens) != (lim.docs, lim.tokens):
            raise SystemExit(f"FAILED: ipt_hpc wrote {ours.tokens:,} tokens, the limit counted {lim.tokens:,}")
        ctx.notes.append(
            f"ipt_hpc's tokens equal the limit's; its first {CHECK_DOCS} documents match the tokenizer id for id"
        )
        for v in variants[2:]:
            diff = ours.tokens - v.best.tokens
            if diff == 0:
                ctx.notes.append(f"{v.name}: the same number of tokens as ipt_hpc")
            elif diff == ours.docs:
                ctx.notes.append(f"{v.name}: 1 token/document fewer than ipt_hpc (it adds no BOS)")
            else:
                ctx.notes.append(f"{v.name}: {-diff:+,} tokens vs ipt_hpc")
        report(variants, ctx, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
