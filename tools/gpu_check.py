"""The prepared GPU check (issue 27): our Megatron-Core training's speed on one GPU, side by side in one process
tree, written as JSON and a short Markdown table to a folder. Run it through ``tools/gpu-check OUT``.

Sections, in the order they run (each one timed and reported on its own; a failed one does not stop the rest,
and a section that would start past ``--budget-s`` is skipped and says so):

* ``environment``: torch, CUDA, cuDNN, device, Transformer Engine, megatron-core.
* ``attention``: one attention core, forward and forward+backward, bf16, causal, at head dims 64 (the
  doctor's model) and 128 (the 1.3B config; Llama-3-8B's GQA 32/8): Megatron-Core's unfused
  ``DotProductAttention``, our ``SDPAttention`` as dispatched, and SDPA forced to each backend (flash,
  cuDNN, memory-efficient, math).
* the runs of :func:`plan`: ``python -m ipt_hpc.model.train`` under torchrun, one rank, on one set of
  synthetic tokens (``ipt_hpc.doctor``'s documents), beside Hugging Face ``LlamaForCausalLM`` with SDPA, bf16
  weights and AdamW on the same tokens (the doctor's ``hf_baseline``, the reference of the issue's target).
  The doctor's 348.7M model as a GPU run gets it (SDPA, SwiGLU and cross-entropy fusions, compiled RoPE),
  then without the fusions, with unfused attention, with eager RoPE, at micro-batch 8; the
  ``configs/train/instructlm-1.3b.yaml`` shape at sequence 2048; 2 layers of the Llama-3-8B shape (hidden
  4096, ffn 14336, GQA 32/8, vocabulary 128,256). tokens/s and MFU are medians over the steps after the
  warm-up (compiles); peak memory is ``torch.cuda.max_memory_allocated``; the last step is profiled
  (``train.torch_profile_step``) and left out of the medians; the loss gap compares the unfused and SDPA
  runs step for step (same seed, same data).

``--smoke`` runs the same code on the CPU with a tiny model and few steps (CI runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipt_hpc import doctor  # noqa: E402

DOCTOR_MODEL = doctor.GPU_MODEL
LLAMA_1P3B = {  # configs/train/instructlm-1.3b.yaml
    "num_layers": 24,
    "hidden_size": 2048,
    "ffn_hidden_size": 5632,
    "num_attention_heads": 16,
    "vocab_size": 32000,
}
LLAMA3_8B_SLICE = {
    "num_layers": 2,
    "hidden_size": 4096,
    "ffn_hidden_size": 14336,
    "num_attention_heads": 32,
    "num_query_groups": 8,
    "vocab_size": 128256,
    "rotary_base": 500000,
}
TINY = {
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 172,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "vocab_size": 512,
}
DOCTOR_SHAPE = {"seq_length": 2048, "micro_batch_size": 4, "global_batch_size": 32}  # ipt_hpc.doctor.GPU_RUN
TINY_SHAPE = {"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4}
DEFAULT = {"attention": "sdpa", "fusions": "on"}  # what a device: cuda run gets (rope_fusion auto: compiled)


@dataclass
class Run:
    """One training run of the check: ``hf`` (Hugging Face's baseline) or ours with ``train.*`` settings."""

    name: str
    model: dict[str, Any]
    shape: dict[str, int]
    sets: dict[str, Any] | None = None  # None: the Hugging Face baseline
    cost_s: float = 45  # what it may take on an H200 (start-up and compiles included), for the budget


def plan(gpu: bool) -> list[Run]:
    """The runs, the target's figures first: ours as a GPU run gets it beside HF on the same tokens, then
    what each choice buys (fusions off, RoPE eager, unfused attention), the larger shapes, a larger
    micro-batch."""
    model, shape = (DOCTOR_MODEL, DOCTOR_SHAPE) if gpu else (TINY, TINY_SHAPE)
    runs = [
        Run("train:sdpa+fusions", model, shape, DEFAULT, 50),
        Run("hf", model, shape, None, 20),
        Run("train:sdpa", model, shape, {"attention": "sdpa", "fusions": "off"}, 35),
        Run("train:unfused", model, shape, {"attention": "unfused", "fusions": "off"}, 45),
    ]
    if not gpu:  # smoke: the rest is the same code at other shapes and settings
        return runs
    mbs8 = {**shape, "micro_batch_size": 8}
    big = {"seq_length": 2048, "micro_batch_size": 4, "global_batch_size": 16}
    slice_ = {"seq_length": 2048, "micro_batch_size": 2, "global_batch_size": 8}
    return [
        *runs,
        Run("train_1p3b", LLAMA_1P3B, big, DEFAULT, 60),
        Run("train_llama8b_slice", LLAMA3_8B_SLICE, slice_, DEFAULT, 45),
        Run("train:sdpa+swiglu+ce", model, shape, {**DEFAULT, "rope_fusion": "off"}, 50),
        Run("train:sdpa+fusions mbs8", model, mbs8, DEFAULT, 50),
        Run("hf mbs8", model, mbs8, None, 20),
    ]


class Check:
    """The report: ``check.json`` and ``check.md`` in ``out``, rewritten after every section."""

    def __init__(self, out: Path, smoke: bool, budget_s: float) -> None:
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.started = time.time()
        self.report: dict[str, Any] = {"mode": "smoke (CPU)" if smoke else "gpu", "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn: Callable[[], dict[str, Any]], *, cost_s: float = 0) -> dict[str, Any]:
        elapsed = time.time() - self.started
        if elapsed + cost_s > self.budget_s:
            result: dict[str, Any] = {"ok": False, "skipped": f"budget: {elapsed:.0f} s spent of {self.budget_s:.0f}"}
        else:
            t = time.time()
            try:
                result = {"ok": True, **fn()}
            except Exception as exc:  # noqa: BLE001 - reported; the other sections still run
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            result["seconds"] = round(time.time() - t, 1)
        self.report["sections"][name] = result
        brief = {k: v for k, v in result.items() if k not in ("traceback", "top_kernels", "rows", "losses")}
        status = "ok  " if result["ok"] else "FAIL"
        print(f"gpu-check: {name:<24} {status} {json.dumps(brief, default=str)[:400]}", flush=True)
        self.write()
        return result

    def write(self) -> None:
        self.report["seconds"] = round(time.time() - self.started, 1)
        (self.out / "check.json").write_text(json.dumps(self.report, indent=1, default=str), encoding="utf-8")
        (self.out / "check.md").write_text(markdown(self.report), encoding="utf-8")


# -- sections --------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    import torch

    from ipt_hpc.model.train.profile import te_available

    try:
        import megatron.core as mc

        megatron = mc.__version__
    except ImportError:
        megatron = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "megatron_core": megatron,
        "transformer_engine": te_available(),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
    }


def attention_bench(smoke: bool) -> dict[str, Any]:
    """Unfused vs SDPA (as dispatched, and each backend forced) on one attention core, bf16 (fp32 on CPU)."""
    import torch
    import torch.distributed as dist
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.cuda.is_available() and not smoke
    if smoke:
        shapes = [("tiny hn16", 2, 64, 4, 2, 16)]
    else:  # (label, batch, seq, heads, kv heads, head dim)
        shapes = [
            ("doctor 16/8 x 64", 4, 2048, 16, 8, 64),
            ("1.3B 16/16 x 128", 4, 2048, 16, 16, 128),
            ("llama3-8B 32/8 x 128", 2, 2048, 32, 8, 128),
        ]
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if not cuda:
        from ipt_hpc.model.train import cpu_shims

        cpu_shims.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ipt_hpc.model.train.attention import sdpa_attention_class

    ps.initialize_model_parallel(1, 1)
    if cuda:  # the unfused path forks Megatron's CUDA RNG tracker for its (zero) attention dropout
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    rows = []
    try:
        for label, b, s, heads, groups, hn in shapes:
            cfg = TransformerConfig(
                num_layers=1,
                hidden_size=heads * hn,
                num_attention_heads=heads,
                num_query_groups=groups,
                kv_channels=hn,
                attention_dropout=0.0,
                masked_softmax_fusion=False,  # apex's kernel (not installed), as in our training profile
                attention_softmax_in_fp32=True,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_cpu_initialization=not cuda,
            )
            q = torch.randn(s, b, heads, hn, device=device, dtype=dtype)
            k = torch.randn(s, b, groups, hn, device=device, dtype=dtype)
            v = torch.randn(s, b, groups, hn, device=device, dtype=dtype)
            flops_fwd = 4 * b * heads * s * s * hn / 2  # causal: half of QK^T and PV
            impls: list[tuple[str, Callable[[], Any], Any]] = [
                ("unfused (Megatron)", lambda c=cfg: DotProductAttention(c, 1, AttnMaskType.causal, "self"), None),
                ("sdpa (dispatched)", lambda c=cfg: sdpa_attention_class()(c, 1, AttnMaskType.causal, "self"), None),
            ]
            for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
                maker = lambda c=cfg: sdpa_attention_class()(c, 1, AttnMaskType.causal, "self")  # noqa: E731
                impls.append((f"sdpa {backend.split('_')[0].lower()}", maker, getattr(SDPBackend, backend)))
            for name, make, backend in impls:
                row: dict[str, Any] = {"shape": label, "impl": name}
                try:
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        module = make().to(device)
                        fwd, both = _time_attention(module, q, k, v, cuda, iters=2 if smoke else 10)
                    row.update(
                        fwd_ms=round(fwd * 1e3, 3),
                        fwd_bwd_ms=round(both * 1e3, 3),
                        fwd_bwd_tflops=float(f"{3.5 * flops_fwd / both / 1e12:.3g}"),
                        kernel=_choice(module, q, k, v),
                    )
                except Exception as exc:  # noqa: BLE001 - a backend that cannot serve this shape is a row
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return {"dtype": str(dtype).removeprefix("torch."), "rows": rows}


def _choice(module: Any, q: Any, k: Any, v: Any) -> str | None:
    if not hasattr(module, "choice"):
        return None
    return module.choice(*(t.permute(1, 2, 0, 3) for t in (q, k, v))).describe()


def _time_attention(module: Any, q: Any, k: Any, v: Any, cuda: bool, iters: int) -> tuple[float, float]:
    """Median seconds of a forward, and of a forward plus backward, after warm-up."""
    import torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn(q.size(0), q.size(1), q.size(2) * q.size(3), device=q.device, dtype=q.dtype)
    fwd, both = [], []
    for i in range(iters + 2):
        sync()
        t = time.perf_counter()
        out = module(qq, kk, vv, None)
        sync()
        t1 = time.perf_counter()
        out.backward(grad)
        sync()
        t2 = time.perf_counter()
        if i >= 2:
            fwd.append(t1 - t)
            both.append(t2 - t)
        qq.grad = kk.grad = vv.grad = None
    return statistics.median(fwd), statistics.median(both)


def train_run(ctx: doctor.Context, run: Run, steps: int) -> dict[str, Any]:
    """One ``python -m ipt_hpc.model.train`` run under torchrun, one rank, on the shared tokens; its figures."""
    from ipt_hpc.config import ModelConfig, TrainConfig
    from ipt_hpc.model.train.model import num_parameters

    folder = ctx.work / run.name.replace(":", "-").replace("+", "_").replace(" ", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "tokens").symlink_to(ctx.run / "tokens", target_is_directory=True)
    shape = {**run.shape, "train_iters": steps, "resume_iters": 0}
    sub = doctor.Context(gpu=ctx.gpu, work=ctx.work, log=ctx.log, model=run.model, shape=shape)
    sets = {"final_save": False, "torch_profile_step": steps, "lr_decay_iters": steps + 10, **(run.sets or {})}
    doctor.torchrun(sub, folder, doctor.train_config(sub, steps, name=folder.name, **sets), 1)
    all_steps, events = doctor.train_log(folder)
    start = next(e for e in events if e["event"] == "start")
    warm = 2 if ctx.gpu else 1
    timed = all_steps[warm:-1] or all_steps[-1:]  # after the warm-up (compiles, allocations), not the profiled step
    mfu = [s["mfu"] for s in timed if s.get("mfu") is not None]
    profile_json = folder / "train" / f"torch-profile-{steps}.json"
    profile = start["profile"]
    return {
        "parameters": num_parameters(TrainConfig(model=ModelConfig(**run.model))),
        "micro_batch_size": run.shape["micro_batch_size"],
        "tokens_per_step": run.shape["global_batch_size"] * run.shape["seq_length"],
        "attention": profile["attention"],
        "attention_kernel": start.get("attention_kernel"),
        "fusions": {k: profile[k] for k in ("swiglu_fusion", "cross_entropy_fusion", "rope_fusion")},
        "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in timed), 1),
        "mfu": round(statistics.median(mfu), 4) if mfu else None,
        "peak_mem_gib": max((s.get("mem_gib") or 0) for s in all_steps) or None,
        "first_step_s": all_steps[0]["step_s"],
        "losses": [round(s["loss"], 5) for s in all_steps],
        "top_kernels": json.loads(profile_json.read_text())["top"][:12] if profile_json.exists() else [],
    }


def hf_run(ctx: doctor.Context, run: Run, steps: int) -> dict[str, Any]:
    """The doctor's Hugging Face baseline (SDPA, bf16 weights and AdamW) on the same tokens."""
    import torch

    shape = {**run.shape, "train_iters": steps, "resume_iters": 0}
    sub = doctor.Context(gpu=ctx.gpu, work=ctx.work, log=ctx.log, model=run.model, shape=shape)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = doctor.check_hf_baseline(sub)  # reads ctx.run's tokens
    if torch.cuda.is_available():
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()
    result.pop("megatron_over_hf_per_device", None)
    return {"micro_batch_size": run.shape["micro_batch_size"], **result}


# -- the report ------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """``check.md``: the environment, the attention table, the training table, the loss gap, top kernels."""
    sec = report["sections"]
    lines = [f"# gpu-check ({report['mode']}), {report.get('seconds', 0):.0f} s", ""]
    env = sec.get("environment", {})
    if env.get("ok"):
        te = "yes" if env["transformer_engine"] else "no"
        lines += [
            f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
            f"megatron-core {env['megatron_core']}, Transformer Engine: {te}",
            "",
        ]
    att = sec.get("attention", {})
    if att.get("rows"):
        lines += [
            f"## Attention core, causal, {att['dtype']}",
            "",
            "| shape | implementation | kernel | forward ms | forward+backward ms | TFLOP/s |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in att["rows"]:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['impl']} | — | {r['error'][:70]} | | |")
                continue
            figures = f"{r['fwd_ms']} | {r['fwd_bwd_ms']} | {r['fwd_bwd_tflops']}"
            lines.append(f"| {r['shape']} | {r['impl']} | {r.get('kernel') or '—'} | {figures} |")
        lines.append("")
    hf = {r["micro_batch_size"]: r["tokens_per_s"] for n, r in sec.items() if n.startswith("hf") and r.get("ok")}
    lines += [
        "## Training, one GPU",
        "",
        "| run | micro-batch | attention (kernel) | fusions | tokens/s | MFU | peak GiB | vs HF, same micro-batch |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, r in sec.items():
        if not name.startswith(("train", "hf")):
            continue
        if not r.get("ok"):
            lines.append(f"| {name} | | {r.get('skipped') or (r.get('error') or '')[:90]} | | | | | |")
            continue
        if name.startswith("hf"):
            attention, fused = "HF SDPA, bf16 weights and AdamW", "—"
        else:
            attention = f"{r['attention']} ({r.get('attention_kernel') or '—'})"
            fused = ", ".join(k.split("_")[0] for k, v in r["fusions"].items() if v and v != "off") or "none"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—"
        base = hf.get(r["micro_batch_size"]) if name.startswith("train:") else None
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        figures = f"{r['tokens_per_s']:,.0f} | {mfu} | {r.get('peak_mem_gib') or '—'} | {ratio}"
        lines.append(f"| {name} | {r['micro_batch_size']} | {attention} | {fused} | {figures} |")
    gap = report.get("loss_gap")
    if gap:
        lines += [
            "",
            f"Loss gap, unfused vs SDPA, first {gap['steps']} steps: max {gap['max_abs']:.2e}"
            f" (relative {gap['max_rel']:.2e}).",
        ]
    for name, r in sec.items():
        if r.get("top_kernels"):
            lines += ["", f"Top kernels of {name}'s profiled step (self time):", ""]
            for k in r["top_kernels"][:8]:
                lines.append(f"- {k['share']:.1%} {k['self_ms']} ms x{k['calls']}: {k['name'][:110]}")
    return "\n".join(lines) + "\n"


def loss_gap(sec: dict[str, Any]) -> dict[str, Any] | None:
    """The largest step-for-step loss difference between the unfused and the SDPA run (same seed and data)."""
    a, b = sec.get("train:unfused", {}), sec.get("train:sdpa", {})
    if not (a.get("ok") and b.get("ok")):
        return None
    n = min(len(a["losses"]), len(b["losses"]))
    diffs = [abs(x - y) for x, y in zip(a["losses"][:n], b["losses"][:n], strict=True)]
    rel = [d / abs(x) for d, x in zip(diffs, a["losses"][:n], strict=True)]
    return {"steps": n, "max_abs": max(diffs), "max_rel": max(rel)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for check.json and check.md")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps (CI)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip sections that would start later than this")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 10 GPU, 4 smoke)")
    ap.add_argument("--only", default=None, help="comma-separated section names (default: all)")
    args = ap.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --smoke for the CPU run", file=sys.stderr)
        return 2
    gpu = not args.smoke
    steps = args.steps or (10 if gpu else 4)
    only = set(args.only.split(",")) if args.only else None
    check = Check(args.out, args.smoke, args.budget_s)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    runs = plan(gpu)
    # one token set for every run, enough for the largest batch; ids < 32,000 fit every vocabulary here
    shape = {**runs[0].shape, "train_iters": steps + 4, "resume_iters": 0}
    ctx = doctor.Context(gpu=gpu, work=work, log=print, model=runs[0].model, shape=shape)
    doctor.write_tokens(ctx)

    check.section("environment", environment)
    if only is None or "attention" in only:
        check.section("attention", lambda: attention_bench(args.smoke), cost_s=20)
    for run in runs:
        if only is None or run.name in only:
            fn = hf_run if run.sets is None else train_run
            check.section(run.name, lambda fn=fn, run=run: fn(ctx, run, steps), cost_s=run.cost_s)
    sec = check.report["sections"]
    check.report["loss_gap"] = loss_gap(sec)
    check.write()
    shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, r in sec.items() if not r.get("ok")]
    print((args.out / "check.md").read_text())
    print(f"gpu-check: {'all sections passed' if not failed else 'FAILED or skipped: ' + ', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
