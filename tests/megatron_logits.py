"""Megatron-Core's own logits for some tokens, computed by the ranks of a TP x PP layout (run under torchrun).

``python -m torch.distributed.run --nproc-per-node=TP*PP tests/megatron_logits.py RUN CKPT TOKENS.pt OUT.pt TP PP``

Each rank builds its slice of the run's GPTModel, loads its shard of the checkpoint with dist_checkpointing,
and runs the forward pass: pipeline stages hand their hidden states on with send/recv, the last stage's
tensor-parallel ranks gather their vocabulary slices. Rank 0 of the last stage writes ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def main(run: str, ckpt: str, tokens_path: str, out_path: str, tp: int, pp: int) -> None:
    warnings.filterwarnings("ignore")
    from ipt_hpc.config import load_config
    from ipt_hpc.model.train import cpu_shims
    from ipt_hpc.model.train.model import build_model
    from ipt_hpc.model.train.profile import cpu_profile
    from ipt_hpc.model.train.stage import resolved_config_path

    cfg = load_config(resolved_config_path(Path(run))).train
    cfg = cfg.model_copy(update={"tensor_parallel": tp, "pipeline_parallel": pp})
    dist.init_process_group("gloo")
    cpu_shims.apply()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tp, pp)
    model = build_model(cfg, cpu_profile(cfg, bf16=False))
    template = model.sharded_state_dict()
    state = dist_checkpointing.load(template, ckpt, strict="raise_unexpected")
    model.load_state_dict({k: state[k] for k in template}, strict=True)
    model.eval()

    tokens = torch.load(tokens_path)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    hidden_shape = (tokens.shape[1], tokens.shape[0], cfg.model.hidden_size)  # [seq, batch, hidden]
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(hidden_shape)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, positions, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        else:
            parts = [torch.empty_like(out) for _ in range(tp)]  # each TP rank holds a slice of the vocabulary
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
            if ps.get_tensor_model_parallel_rank() == 0:
                torch.save(logits.float(), out_path)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]))
