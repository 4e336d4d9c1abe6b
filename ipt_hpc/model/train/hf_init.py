"""Continual pre-training: a Hugging Face Llama/Mistral folder -> the run's first checkpoint ``iter_0000000``.

    HF folder (config.json + safetensors) --checked against train.model--> fuse q/k/v per query group,
    [gate; up] -> fc1, rename, pad the vocabulary --> GPTModel at TP=1 PP=1 (one CPU process)
    --dist_checkpointing.save--> RUN/train/checkpoints/iter_0000000 (model only; meta.json says so)

Training at any TP/PP loads it like its own checkpoints (dist_checkpointing reshards), but only the model: the
optimizer and schedule start fresh at iteration 0. The run's later saves supersede it, so a resumed run never
imports again. This is the inverse of :func:`ipt_hpc.model.train.hf_mapping.to_hf`; see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...atomic import fsync_dir, write_json_atomic
from ...config import TrainConfig
from ...errors import IptError
from ...layout import RunLayout
from . import checkpoint
from .hf_mapping import from_hf

VOCAB_MULTIPLE = 128  # model-config pads the vocabulary to this (any TP size up to 128 divides it)
MODEL_TYPES = ("llama", "mistral")


# -- the config -----------------------------------------------------------------------------------------
def read_hf_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder, as a dict."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise IptError(f"train.init_from_hf: {path} does not exist; point it at a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _rope(hf: dict[str, Any]) -> tuple[float, str]:
    """RoPE base and type (transformers 4: rope_theta + rope_scaling; 5: rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    return float(theta), kind


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """``train.model`` keys describing the Hugging Face config (vocabulary padded to :data:`VOCAB_MULTIPLE`)."""
    heads = hf["num_attention_heads"]
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "vocab_size": math.ceil(hf["vocab_size"] / VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        "rotary_base": int(_rope(hf)[0]),
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
    }


def unsupported(hf: dict[str, Any], seq_length: int) -> list[str]:
    """What in the Hugging Face config the train stage's GPTModel cannot reproduce."""
    problems = []
    if hf.get("model_type") not in MODEL_TYPES:
        problems.append(f"model_type is {hf.get('model_type')!r}; only {', '.join(MODEL_TYPES)} are supported")
    if hf.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings is true; the train stage trains untied embeddings and lm_head")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {hf.get('hidden_act')!r}; the model uses SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias is true; the model has no biases")
    if _rope(hf)[1] != "default":
        problems.append(f"rope scaling {_rope(hf)[1]!r} is not supported (plain RoPE only)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        problems.append(f"head_dim {head_dim} x {hf['num_attention_heads']} heads != hidden_size {hf['hidden_size']}")
    window = hf.get("sliding_window")
    if hf.get("model_type") == "mistral" and window is not None and window < seq_length:
        problems.append(f"sliding_window {window} < train.seq_length {seq_length}; the model attends over all tokens")
    return problems


def check_hf_config(cfg: TrainConfig, folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Raise if ``train.model`` does not describe the Hugging Face model in ``folder``; returns its config."""
    hf = read_hf_config(folder)
    problems = unsupported(hf, cfg.seq_length)
    if not problems:
        m = cfg.model
        for key, theirs in model_fields(hf).items():
            ours = getattr(m, key)
            if key == "num_query_groups":
                ours = ours or m.num_attention_heads
            if key == "vocab_size":
                if ours < hf["vocab_size"]:
                    problems.append(f"train.model.vocab_size is {ours}, below the checkpoint's {hf['vocab_size']} rows")
            elif key == "norm_epsilon" and math.isclose(ours, theirs, rel_tol=1e-6):
                continue
            elif ours != theirs:
                problems.append(f"train.model.{key} is {ours}, the checkpoint has {theirs}")
    if problems:
        raise IptError(
            f"train.init_from_hf: {folder} does not fit this config:\n  - "
            + "\n  - ".join(problems)
            + f"\n`python -m ipt_hpc.model.train.hf_init model-config {folder}` prints the matching train.model keys"
        )
    return hf


# -- the tensors ----------------------------------------------------------------------------------------
def load_hf_tensors(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise IptError(f"train.init_from_hf: {folder} has no model.safetensors(.index.json); save it with safetensors")
    tensors: dict[str, Any] = {}
    for name in files:
        tensors |= load_file(str(folder / name))
    return tensors


# -- the import -----------------------------------------------------------------------------------------
def import_checkpoint(cfg: TrainConfig, root: Path, log: Any = print) -> Path:
    """Write ``root/iter_0000000`` (model only) from ``cfg.init_from_hf``, as a complete checkpoint
    (``.tmp`` folder, ``meta.json``, rename, ``latest.json``). One CPU process, TP=1 PP=1."""
    import torch
    from megatron.core import dist_checkpointing

    from ..export import megatron_process
    from .model import build_model
    from .profile import cpu_profile

    started = time.time()
    folder = Path(cfg.init_from_hf or "")
    check_hf_config(cfg, folder)
    tensors = load_hf_tensors(folder)
    dtype = tensors["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in tensors else None
    bf16 = dtype == torch.bfloat16  # kept as saved (exact); anything else is stored as float32
    state = from_hf(tensors, cfg, str(folder))
    del tensors
    final, tmp = checkpoint.iter_dir(root, 0), root / "iter_0000000.tmp"
    with megatron_process():
        single = cfg.model_copy(update={"tensor_parallel": 1, "pipeline_parallel": 1})
        model = build_model(single, cpu_profile(single, bf16=bf16), initialize=False)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:  # a mapping bug, not a user error
            raise IptError(f"train.init_from_hf: mapping incomplete: {missing[:4]} {result.unexpected_keys[:4]}")
        del state
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    meta = {
        "iteration": 0,
        "model_only": True,
        "init_from_hf": str(folder.resolve()),
        "tp": 1,
        "pp": 1,
        "dtype": str(torch.bfloat16 if bf16 else torch.float32).removeprefix("torch."),
        "save_s": round(time.time() - started, 3),
    }
    write_json_atomic(tmp / "meta.json", meta)
    os.replace(tmp, final)
    fsync_dir(root)
    write_json_atomic(root / checkpoint.TRACKER, {"iteration": 0, "dir": final.name})
    log(f"train: imported {folder} into {final} in {meta['save_s']} s")
    return final


def ensure_imported(cfg: TrainConfig, run_dir: Path, poll_s: float = 1.0) -> None:
    """Before the process group exists: if ``train.init_from_hf`` is set and the run has no checkpoint, rank 0
    imports it (a CPU subprocess) while the other ranks wait for ``iter_0000000`` to appear."""
    if not cfg.init_from_hf:
        return
    root = RunLayout.of(run_dir).checkpoints
    if checkpoint.latest(root) is not None:
        return  # the run's own checkpoints (or an earlier import) take precedence
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank != 0:
        while checkpoint.latest(root) is None:  # if rank 0 fails, torchrun / srun end this rank
            time.sleep(poll_s)
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # one CPU process, its own gloo group
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "ipt_hpc.model.train.hf_init",
        "import",
        str(root),
        "--config-json",
        cfg.model_dump_json(),
    ]
    if subprocess.call(cmd, env=env) != 0:
        raise SystemExit(f"train: importing {cfg.init_from_hf} failed (see the message above)")


def main(argv: list[str] | None = None) -> int:
    """``model-config HF_DIR``: print the matching ``train.model`` keys; ``import ROOT --config-json``: internal."""
    import yaml

    p = argparse.ArgumentParser(prog="python -m ipt_hpc.model.train.hf_init", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    mc = sub.add_parser("model-config", help="print train.model keys for a Hugging Face Llama/Mistral folder")
    mc.add_argument("folder")
    imp = sub.add_parser("import", help="(used by the train ranks) write ROOT/iter_0000000 from train.init_from_hf")
    imp.add_argument("root")
    imp.add_argument("--config-json", required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "model-config":
            hf = read_hf_config(args.folder)
            problems = unsupported(hf, seq_length=0)
            sys.stdout.write(yaml.safe_dump({"train": {"model": model_fields(hf)}}, sort_keys=False))
            for problem in problems:
                print(f"# not supported: {problem}", file=sys.stderr)
            return 1 if problems else 0
        import_checkpoint(TrainConfig.model_validate_json(args.config_json), Path(args.root))
    except IptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
