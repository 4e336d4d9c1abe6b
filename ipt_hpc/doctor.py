"""``doctor``: check a machine before a large submission, and measure it.

``doctor`` (CPU) and ``doctor --gpu`` run the same checks through the real code paths, one after another,
each timed and reported, and write one JSON file:

* ``environment``: versions of Python, torch, transformers, megatron-core; CUDA devices; Transformer Engine;
* ``cuda``, ``nccl``, ``bf16`` (``--gpu`` only): a device, a one-rank NCCL all-reduce, bf16 support and a
  bf16 matrix product's TFLOP/s;
* ``records``: a zstd JSON Lines file written and read back;
* ``synthesis``: the transformers engine on the shipped tiny synthesizer (``models/tiny-synthesizer``) over a
  few documents: parsed pairs, generated tokens/s (vLLM is not part of it: its wheel is too large to carry);
* ``train``: ``python -m ipt_hpc.model.train`` (torchrun, one rank per GPU) on synthetic token data with the
  configuration a real run gets (on GPU: bf16, the distributed optimizer, its ``dp_reshardable`` checkpoint);
  tokens/s and MFU over the steps after the first;
* ``hf_baseline``: Hugging Face transformers training the same model on the same tokens (AdamW, same
  batch), tokens/s and MFU, and the ratio Megatron-Core / transformers;
* ``resume``: the training run continued from its checkpoint (a new process group loads it);
* ``export``: the checkpoint exported to a Hugging Face folder with its logits checked against Megatron's.

On GPU the model is Llama-style, ~350M parameters (``GPU_MODEL``), sized to finish in a few minutes on one
H100/H200. It needs torch and transformers (both in NVIDIA's and most clusters' images) plus ipt_hpc's
light dependencies, which can travel as wheels (docs/doctor.md); it imports neither ``datasets`` nor
``lm_eval`` nor ``vllm``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_json_atomic
from .layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
TINY_SYNTH = REPO / "models" / "tiny-synthesizer"
EOD = 1

# the model each mode trains: CPU: seconds on 2 cores; GPU: a ~350M Llama-style model, minutes on one H200
CPU_MODEL = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 172, "num_attention_heads": 4, "vocab_size": 512}
GPU_MODEL = {
    "num_layers": 24,
    "hidden_size": 1024,
    "ffn_hidden_size": 2816,
    "num_attention_heads": 16,
    "num_query_groups": 8,
    "vocab_size": 32000,
}
CPU_RUN = {"seq_length": 64, "micro_batch_size": 4, "global_batch_size": 8, "train_iters": 8, "resume_iters": 4}
GPU_RUN = {"seq_length": 2048, "micro_batch_size": 4, "global_batch_size": 32, "train_iters": 30, "resume_iters": 5}
SYNTH_DOCS = [
    "Slurm schedules batch jobs on a cluster. A job array runs the same script over many inputs, and each "
    "task reads its index from SLURM_ARRAY_TASK_ID.",
    "The instruction synthesizer reads a raw text and writes question and answer pairs about it, which are "
    "then mixed with the text to pre-train a language model.",
    "Zstandard compresses data in frames. A frame that ends at a record boundary can be read on its own, so "
    "a file cut after a complete frame is still readable.",
    "A checkpoint holds the model weights, the optimizer state and the position in the data, so that a "
    "job stopped by the scheduler can continue where it stopped.",
]


@dataclass
class Check:
    name: str
    what: str
    fn: Callable[[Context], dict[str, Any]]
    gpu_only: bool = False


@dataclass
class Context:
    gpu: bool
    work: Path
    log: Callable[[str], None]
    gpus: int = 0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # default: GPU_MODEL or CPU_MODEL
    shape: dict[str, int] = field(default_factory=dict)  # default: GPU_RUN or CPU_RUN

    def __post_init__(self) -> None:
        self.model = self.model or (GPU_MODEL if self.gpu else CPU_MODEL)
        self.shape = self.shape or (GPU_RUN if self.gpu else CPU_RUN)

    @property
    def run(self) -> Path:
        """The run folder of the doctor's training (tokens, checkpoints, log)."""
        return self.work / "run"

    @property
    def ranks(self) -> int:
        """Training ranks: one per visible GPU (``cuda`` check), one on CPU."""
        return max(1, self.gpus) if self.gpu else 1


# -- checks -------------------------------------------------------------------------------------------------
def check_environment(ctx: Context) -> dict[str, Any]:
    import torch
    import transformers

    from .model.train.profile import te_available

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("megatron.core", "submitit", "zstandard", "pydantic"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "host": socket.gethostname(),
        "versions": versions,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "transformer_engine": te_available(),
        "missing": [k for k, v in versions.items() if v is None],
        "ok": all(v is not None for v in versions.values()),
    }


def check_cuda(ctx: Context) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch sees no CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    ctx.gpus = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    return {
        "devices": ctx.gpus,
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def check_nccl(ctx: Context) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    if not dist.is_nccl_available():
        raise RuntimeError("this torch build has no NCCL")
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        x = torch.ones(1 << 20, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        ok = bool(x[0].item() == 1.0)
    finally:
        dist.destroy_process_group()
    return {"nccl": ".".join(map(str, torch.cuda.nccl.version())), "all_reduce": ok, "ok": ok}


def check_bf16(ctx: Context) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_bf16_supported():
        raise RuntimeError("the GPU does not support bf16")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / 10
    return {"matmul": f"{n}^3 bf16", "tflops": round(2 * n**3 / seconds / 1e12, 1)}


def check_records(ctx: Context) -> dict[str, Any]:
    from .records import RecordWriter, read_records

    path = ctx.work / "records" / "probe.jsonl.zst"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"probe:{i}", "text": f"record {i} ✓ 東京"} for i in range(1000)]
    writer = RecordWriter(path)
    for row in rows:
        writer.write(row)
    writer.close()
    back = list(read_records(path))
    if back != rows:
        raise RuntimeError(f"{path}: read {len(back)} records, not the 1000 written")
    return {"records": len(back), "bytes": path.stat().st_size}


def check_synthesis(ctx: Context) -> dict[str, Any]:
    from .stages.synth_engines import TransformersEngine
    from .stages.synth_format import context_text, parse_pairs

    engine = TransformersEngine(
        str(TINY_SYNTH), device="cuda" if ctx.gpu else "cpu", dtype="float32", batch_size=len(SYNTH_DOCS)
    )
    tok = engine.tokenizer
    prompts = [[tok.bos_token_id, *tok(context_text(t), add_special_tokens=False)["input_ids"]] for t in SYNTH_DOCS]
    t = time.perf_counter()
    gens = engine.generate(prompts, 128)
    seconds = time.perf_counter() - t
    pairs = [len(parse_pairs(g.text)[0]) for g in gens]
    errors = [g.error for g in gens if g.error]
    if errors:
        raise RuntimeError(f"engine errors: {errors}")
    tokens = sum(len(g.ids) for g in gens)
    return {
        "documents": len(gens),
        "pairs": pairs,
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "ok": sum(pairs) > 0,
    }


def train_config(ctx: Context, iters: int, name: str | None = None, **overrides: Any) -> Path:
    """The run's config: the model and batch of this mode, the profile a real run of this device gets
    (``overrides``: more ``train.*`` keys, e.g. ``attention="unfused"``)."""
    shape = ctx.shape
    train = {
        "device": "cuda" if ctx.gpu else "cpu",
        "model": dict(ctx.model),
        "data": {"groups": {"probe": 1.0}},
        "seq_length": shape["seq_length"],
        "micro_batch_size": shape["micro_batch_size"],
        "global_batch_size": shape["global_batch_size"],
        "train_iters": iters,
        "lr_decay_iters": shape["train_iters"] + shape["resume_iters"],
        "lr": 3e-4,
        "min_lr": 3e-5,
        "lr_warmup_iters": 2,
        "ranks_per_node": ctx.ranks,
        "log_interval": 1,
        "keep_checkpoints": 1,
        **overrides,
    }
    path = ctx.work / f"{name or 'train'}-{iters}.yaml"
    path.write_text(yaml.safe_dump({"train": train}, sort_keys=False), encoding="utf-8")
    return path


def write_tokens(ctx: Context) -> Path:
    """Synthetic documents (short repeating patterns, learnable) as a Megatron indexed dataset group in
    ``ctx.run``; returns the run folder."""
    import numpy as np

    from .indexed import IndexedWriter, dtype_for_vocab

    run = ctx.run
    shape, vocab = ctx.shape, ctx.model["vocab_size"]
    need = (shape["train_iters"] + shape["resume_iters"] + 4) * shape["global_batch_size"] * (shape["seq_length"] + 1)
    rng = np.random.default_rng(0)
    docs, total = [], 0
    while total < need:
        length, period, start = int(rng.integers(50, 2000)), int(rng.integers(3, 17)), int(rng.integers(2, vocab - 20))
        doc = (start + (np.arange(length) % period) * 7) % (vocab - 2) + 2
        docs.append(np.append(doc, EOD))
        total += length + 1
    writer = IndexedWriter(RunLayout.of(run).token_group("probe"), dtype_for_vocab(vocab))
    writer.add(np.concatenate(docs), np.array([len(d) for d in docs]))
    writer.close()
    write_json_atomic(RunLayout.of(run).token_group("probe") / "manifest.json", {"config": {"eod_id": EOD}})
    return run


def _child_env() -> dict[str, str]:
    """The environment for the doctor's subprocesses, which run in a scratch folder: ``ipt_hpc`` stays
    importable there when it is used from a checkout (``PYTHONPATH=$PWD``, or started from the repository
    root) rather than installed."""
    root = str(Path(__file__).resolve().parents[1])
    path = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def torchrun(ctx: Context, run: Path, config: Path, nproc: int) -> None:
    from .model.train.stage import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    cmd += ["-m", "ipt_hpc.model.train", str(run), "--config", str(config)]
    log = ctx.work / f"{config.stem}.log"
    with open(log, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ctx.work, env=_child_env())
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"training exited with {rc} (log: {log}):\n{tail}")


def train_log(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(steps in iteration order, events) of ``RUN/train/log.jsonl``; a step redone after a resume counts once."""
    from .model.train.metrics import read_steps

    log = RunLayout.of(run).train_log
    steps = read_steps(log)
    events = [r for r in map(json.loads, log.read_text(encoding="utf-8").splitlines()) if r.get("kind") == "event"]
    return [steps[i] for i in sorted(steps)], events


def check_train(ctx: Context) -> dict[str, Any]:
    run = write_tokens(ctx)
    torchrun(ctx, run, train_config(ctx, ctx.shape["train_iters"]), ctx.ranks)
    all_steps, events = train_log(run)
    first, steps = all_steps[0], all_steps[1:]  # the first step compiles and allocates
    start = next(e for e in events if e["event"] == "start")
    from .config import ModelConfig, TrainConfig
    from .model.train.model import num_parameters

    params = num_parameters(TrainConfig(model=ModelConfig(**ctx.model)))
    mfu = [s["mfu"] for s in steps if s.get("mfu") is not None]
    return {
        "parameters": params,
        "ranks": ctx.ranks,
        "profile": start.get("profile"),
        "attention": (start.get("profile") or {}).get("attention"),
        "attention_kernel": start.get("attention_kernel"),
        "steps": len(all_steps),
        "loss_first_last": [round(first["loss"], 4), round(steps[-1]["loss"], 4)],
        "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in steps), 1),
        "mfu": round(statistics.median(mfu), 4) if mfu else None,
        "ok": steps[-1]["loss"] < first["loss"],
    }


def hf_llama_config(m: dict[str, Any], seq_length: int, **extra: Any) -> Any:
    """Hugging Face's ``LlamaConfig`` with the shapes of the doctor's model ``m`` (untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m.get("num_query_groups") or m["num_attention_heads"],
        max_position_embeddings=seq_length,
        tie_word_embeddings=False,
        **extra,
    )


def check_hf_baseline(ctx: Context) -> dict[str, Any]:
    """Hugging Face transformers trains the same shapes on the same tokens: the reference for tokens/s."""
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from .config import ModelConfig, TrainConfig
    from .indexed import dtype_for_vocab
    from .model.train.model import flops_per_token

    m, shape = ctx.model, ctx.shape
    device = "cuda" if ctx.gpu else "cpu"
    config = hf_llama_config(m, shape["seq_length"])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    probe = RunLayout.of(ctx.run).token_group("probe").with_suffix(".bin")
    data = np.memmap(probe, mode="r", dtype=dtype_for_vocab(m["vocab_size"]))
    seq, mbs = shape["seq_length"], shape["micro_batch_size"]
    micro = shape["global_batch_size"] // (mbs * ctx.ranks)
    steps, times, pos = shape["train_iters"], [], 0
    for _ in range(steps):
        t = time.perf_counter()
        for _ in range(micro):
            rows = [
                np.asarray(data[pos + i * (seq + 1) : pos + (i + 1) * (seq + 1)], dtype=np.int64) for i in range(mbs)
            ]
            pos += mbs * (seq + 1)
            batch = torch.from_numpy(np.stack(rows)).to(device)
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss / micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctx.gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    per_rank_tokens = micro * mbs * seq
    tps = per_rank_tokens / statistics.median(times[1:])
    fpt = flops_per_token(TrainConfig(model=ModelConfig(**m), seq_length=seq))
    megatron = ctx.results.get("train", {})
    # Megatron's tokens/s counts every rank; compare per device
    per_device = (megatron.get("tokens_per_s") or 0) / max(1, megatron.get("ranks", 1))
    peak = TrainConfig().peak_flops
    return {
        "tokens_per_s": round(tps, 1),
        "mfu": round(fpt * tps / peak, 4) if ctx.gpu else None,
        "megatron_over_hf_per_device": round(per_device / tps, 3) if per_device else None,
        "loss_last": round(float(loss.item() * micro), 4),
    }


def check_resume(ctx: Context) -> dict[str, Any]:
    run = ctx.run
    first = ctx.shape["train_iters"]
    config = train_config(ctx, first + ctx.shape["resume_iters"])
    torchrun(ctx, run, config, ctx.ranks)
    steps, events = train_log(run)
    resumed = [e for e in events if e["event"] == "resume"]
    if not resumed or resumed[-1]["iteration"] != first:
        raise RuntimeError(f"no resume from iteration {first}: events {[e.get('event') for e in events]}")
    last = steps[-1]
    meta = json.loads((RunLayout.of(run).checkpoints / f"iter_{last['iteration']:07d}" / "meta.json").read_text())
    return {
        "resumed_from": first,
        "iteration": last["iteration"],
        "optim_sharding": meta.get("optim_sharding"),
        "save_s": meta.get("save_s"),
        "config": str(config),
    }


def check_export(ctx: Context) -> dict[str, Any]:
    run = ctx.run
    out = ctx.work / "hf-export"
    cmd = [
        sys.executable,
        "-m",
        "ipt_hpc.launch",
        "export",
        "--checkpoint",
        str(RunLayout.of(run).checkpoints),
        "--out",
        str(out),
        "--force",
        "--config",
        ctx.results["resume"]["config"],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ctx.work, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"export failed: {proc.stderr[-2000:]}")
    result = json.loads((out / "export.json").read_text()) if (out / "export.json").exists() else {}
    return {"out": str(out), "max_abs_logit_diff": result.get("max_abs_logit_diff"), "line": proc.stdout.strip()}


CHECKS = [
    Check(
        "environment",
        "versions of Python, torch, transformers, megatron-core; CUDA devices; Transformer Engine",
        check_environment,
    ),
    Check("cuda", "a CUDA device is visible", check_cuda, gpu_only=True),
    Check("nccl", "a one-rank NCCL process group all-reduces 4 MB", check_nccl, gpu_only=True),
    Check("bf16", "bf16 is supported; an 8192^3 bf16 matrix product's TFLOP/s", check_bf16, gpu_only=True),
    Check("records", "1,000 zstd JSON Lines records written and read back", check_records),
    Check(
        "synthesis", "the transformers engine on models/tiny-synthesizer, 4 documents, 128 new tokens", check_synthesis
    ),
    Check("train", "Megatron-Core training on synthetic tokens (torchrun, one rank per GPU)", check_train),
    Check("hf_baseline", "Hugging Face transformers trains the same model on the same tokens", check_hf_baseline),
    Check("resume", "the training run resumed from its checkpoint for a few more steps", check_resume),
    Check("export", "the checkpoint exported to Hugging Face, logits checked against Megatron", check_export),
]


def plan(gpu: bool) -> list[str]:
    """What ``doctor`` would run, one line per check (``--dry-run``)."""
    m, shape = (GPU_MODEL, GPU_RUN) if gpu else (CPU_MODEL, CPU_RUN)
    from .config import ModelConfig, TrainConfig
    from .model.train.model import num_parameters

    params = num_parameters(TrainConfig(model=ModelConfig(**m)))
    lines = [f"doctor{' --gpu' if gpu else ''}: {sum(1 for c in CHECKS if gpu or not c.gpu_only)} checks"]
    for c in CHECKS:
        if c.gpu_only and not gpu:
            continue
        lines.append(f"  {c.name:<12} {c.what}")
    layout = "bf16, distributed optimizer, one rank per GPU" if gpu else "fp32, one CPU rank"
    lines.append(
        f"  model: {params / 1e6:.1f}M parameters ({m['num_layers']} layers x {m['hidden_size']},"
        f" vocab {m['vocab_size']}), {shape['train_iters']} + {shape['resume_iters']} steps of"
        f" {shape['global_batch_size']} x {shape['seq_length']} tokens, {layout}"
    )
    return lines


def run(gpu: bool, out: Path, work: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the checks in order (a failed one is reported; those that need it are skipped); write ``out``."""
    ctx = Context(gpu=gpu, work=work, log=log)
    work.mkdir(parents=True, exist_ok=True)
    needs = {"hf_baseline": "train", "resume": "train", "export": "resume"}
    report: dict[str, Any] = {
        "mode": "gpu" if gpu else "cpu",
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checks": {},
    }
    for c in CHECKS:
        if c.gpu_only and not gpu:
            continue
        if needs.get(c.name) and not ctx.results.get(needs[c.name], {}).get("ok", False):
            ctx.results[c.name] = {"ok": False, "skipped": f"needs {needs[c.name]}"}
            log(f"doctor: {c.name:<12} skipped (needs {needs[c.name]})")
            continue
        t = time.perf_counter()
        try:
            result = {"ok": True, **c.fn(ctx)}
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the next checks still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - t, 2)
        ctx.results[c.name] = result
        shown = {k: v for k, v in result.items() if k not in ("traceback", "profile", "versions")}
        log(f"doctor: {c.name:<12} {'ok  ' if result['ok'] else 'FAIL'} {json.dumps(shown, default=str)[:300]}")
    report["checks"] = ctx.results
    report["ok"] = all(r.get("ok") for r in ctx.results.values())
    write_json_atomic(out, report)
    return report
