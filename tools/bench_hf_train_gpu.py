"""Where the doctor's Megatron-vs-Hugging-Face gap comes from: Hugging Face ``LlamaForCausalLM`` training steps
with the doctor's GPU model and batch (``ipt_hpc.doctor.GPU_MODEL``, ``GPU_RUN``), measured side by side in one
run with the two things the doctor's baseline has and our Megatron-Core build (local layer spec, no Transformer
Engine) has not: fused attention (PyTorch SDPA vs the unfused "eager" softmax(QK^T)V) and pure bf16 weights and
optimizer state (vs fp32 weights with bf16 autocast, like Megatron's mixed precision).

    python tools/bench_hf_train_gpu.py            # on a GPU node (about a minute on an H200)
    python tools/bench_hf_train_gpu.py --tiny     # a small model on CPU, to check the script itself

Prints tokens/s per variant and each variant's ratio to the doctor's baseline (sdpa, bf16 weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipt_hpc.doctor import CPU_MODEL, CPU_RUN, GPU_MODEL, GPU_RUN, hf_llama_config

VARIANTS = [
    ("sdpa", "bf16 weights"),
    ("eager", "bf16 weights"),
    ("sdpa", "fp32 weights + bf16 autocast"),
    ("eager", "fp32 weights + bf16 autocast"),
]


def measure(attn: str, precision: str, m: dict, shape: dict, device: str, steps: int) -> float:
    import torch
    from transformers import LlamaForCausalLM

    config = hf_llama_config(m, shape["seq_length"], attn_implementation=attn)
    torch.manual_seed(0)
    pure_bf16 = precision == "bf16 weights" and device == "cuda"
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16 if pure_bf16 else torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    seq, mbs = shape["seq_length"], shape["micro_batch_size"]
    micro = shape["global_batch_size"] // mbs
    autocast = device == "cuda" and not pure_bf16
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        for _ in range(micro):
            batch = torch.randint(0, m["vocab_size"], (mbs, seq), device=device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=batch, labels=batch).loss / micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return micro * mbs * seq / statistics.median(times[2:])


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the doctor's CPU model and batch")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    m, shape = (CPU_MODEL, CPU_RUN) if args.tiny else (GPU_MODEL, GPU_RUN)
    print(
        f"device {device}; {m['num_layers']} layers x {m['hidden_size']}, {shape['global_batch_size']} x "
        f"{shape['seq_length']} tokens a step (micro-batch {shape['micro_batch_size']})"
    )
    base = None
    for attn, precision in VARIANTS:
        tps = measure(attn, precision, m, shape, device, args.steps)
        base = base or tps
        print(f"  {attn:6s} {precision:30s} {tps:12,.0f} tokens/s  {tps / base:5.2f}x")


if __name__ == "__main__":
    main()
