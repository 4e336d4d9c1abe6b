"""The ``export`` stage: a Megatron-Core checkpoint of the train stage -> a Hugging Face Llama/Mistral folder.

    checkpoint (any TP/PP)  --dist_checkpointing.load-->  GPTModel at TP=1 PP=1 (one CPU process)
        --rename + split fused QKV / SwiGLU fc1-->  safetensors + config.json + generation_config.json
        + tokenizer  --verify: HF logits == Megatron logits on probe tokens-->  OUT (renamed from OUT.partial)

``dist_checkpointing`` reshards on load, so the saved layout does not matter: the TP=1 model asks for
whole tensors and gets them assembled from the TP/PP shards. Everything is written into ``OUT.partial``
and renamed to ``OUT`` only after the check passed, so a failed export never leaves a complete-looking
folder. See docs/export.md for the name mapping and the tensor layouts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from ..atomic import partial_path, publish_folder, read_json, write_json_atomic
from ..config import TrainConfig
from ..errors import IptError
from ..layout import RunLayout
from .train.hf_mapping import to_hf

Arch = Literal["llama", "mistral"]
Dtype = Literal["float32", "bfloat16"]
SHARD_BYTES = 4 * 1024**3  # safetensors files above this are split (with model.safetensors.index.json)
VERIFY_ATOL = 1e-3  # max |HF - Megatron| logit difference the export accepts (float32 math: ~1e-6 measured)


@dataclass
class ExportResult:
    """What an export wrote and measured (also saved as ``OUT/export.json``)."""

    out: str
    checkpoint: str
    iteration: int
    saved_layout: dict[str, int]
    checkpoint_dtype: str
    arch: str
    dtype: str
    vocab_size: int
    tokenizer_size: int | None
    tokenizer_adds_bos: bool | None
    max_abs_logit_diff: float | None
    seconds: float
    ipt_hpc_version: str = __version__


# -- locating the checkpoint and its config --------------------------------------------------------
def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The complete checkpoint folder meant by ``path``: an ``iter_N`` folder, a checkpoints folder (its
    latest complete one), or a run folder (``RUN/train/checkpoints``)."""
    from .train.checkpoint import COMPLETE, latest

    path = Path(path)
    if not path.exists():
        raise IptError(f"export: {path} does not exist (expected RUN/train/checkpoints or .../iter_NNNNNNN)")
    if path.name.startswith("iter_") and not COMPLETE.match(path.name):
        raise IptError(f"export: {path} is a torn or partial save (a .tmp folder); use a complete iter_NNNNNNN")
    if COMPLETE.match(path.name):
        if not (path / "meta.json").exists():
            raise IptError(f"export: {path} has no meta.json: the save did not complete; use an earlier iter_N")
        return path
    if RunLayout.of(path).checkpoints.is_dir():
        path = RunLayout.of(path).checkpoints
    found = latest(path)
    if found is None:
        raise IptError(
            f"export: no complete checkpoint in {path} (no iter_NNNNNNN folder with meta.json);"
            " train first, or point --checkpoint at RUN/train/checkpoints/iter_N"
        )
    return found


def run_of(checkpoint: Path) -> RunLayout | None:
    """The run of ``RUN/train/checkpoints/iter_N``, if the checkpoint lives in that layout."""
    return RunLayout.of_checkpoint(checkpoint)


def train_config(checkpoint: Path, config: str | os.PathLike[str] | None = None) -> TrainConfig:
    """The train config the checkpoint was made with: ``config`` if given, else the run's frozen
    ``RUN/train/config.yaml`` (written by ``launch train``)."""
    from ..config import load_config

    if config is None:
        run = run_of(checkpoint)
        frozen = run.train_config if run is not None else None
        if frozen is None or not frozen.exists():
            raise IptError(
                f"export: cannot find the train config of {checkpoint} (looked for"
                f" {frozen or 'RUN/train/config.yaml'}); pass --config FILE, the config the run was trained with"
            )
        config = frozen
    return load_config(config).train


# -- Megatron side -----------------------------------------------------------------------------------
@contextlib.contextmanager
def megatron_process() -> Iterator[None]:
    """A one-rank process group (gloo) with TP=1 PP=1, CPU shims on; torn down afterwards."""
    import torch
    import torch.distributed as dist

    from .train import cpu_shims

    if torch.cuda.is_available():
        raise IptError("export runs on the CPU: start it with CUDA hidden (CUDA_VISIBLE_DEVICES=; the CLI does this)")
    with warnings.catch_warnings():  # Megatron's "Apex/TE not installed", DCP's deprecations: nothing to act on
        for module in ("megatron", "torch.distributed.checkpoint"):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        own_group = not dist.is_initialized()
        if own_group:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        cpu_shims.apply()
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            ps.destroy_model_parallel()
            if own_group:
                dist.destroy_process_group()


def check_shapes(checkpoint: Path, cfg: TrainConfig) -> Any:
    """Compare the checkpoint's global tensor shapes with the config's model; returns the weights' dtype."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    except Exception as exc:  # a damaged folder: say which
        raise IptError(f"export: cannot read the checkpoint metadata of {checkpoint}: {exc}") from exc
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    head = m.hidden_size // m.num_attention_heads
    expected = {
        "embedding.word_embeddings.weight": (m.vocab_size, m.hidden_size),
        "output_layer.weight": (m.vocab_size, m.hidden_size),
        "decoder.layers.self_attention.linear_qkv.weight": (
            m.num_layers,
            (m.num_attention_heads + 2 * groups) * head,
            m.hidden_size,
        ),
        "decoder.layers.mlp.linear_fc1.weight": (m.num_layers, 2 * m.ffn_hidden_size, m.hidden_size),
    }
    for key, shape in expected.items():
        if key not in meta:
            raise IptError(f"export: {checkpoint} has no tensor {key!r}; is it a train-stage GPTModel checkpoint?")
        if tuple(meta[key].global_shape) != shape:
            raise IptError(
                f"export: {checkpoint}: {key} has shape {tuple(meta[key].global_shape)}, the config says {shape};"
                " pass --config with the config the run was trained with"
            )
    return meta["embedding.word_embeddings.weight"].dtype


def load_megatron(checkpoint: Path, cfg: TrainConfig) -> Any:
    """The whole model as one TP=1 PP=1 ``GPTModel`` with the checkpoint's weights (inside
    :func:`megatron_process`). dist_checkpointing assembles each tensor from however it was sharded."""
    from megatron.core import dist_checkpointing

    from .train.model import build_model
    from .train.profile import cpu_profile

    meta = Path(checkpoint) / "meta.json"
    if meta.exists() and read_json(meta).get("layer_spec") == "transformer_engine":
        raise IptError(
            f"export: {checkpoint} was trained with train.layer_spec=transformer_engine, whose tensor names"
            " (fused norms) this export does not map yet; train with train.layer_spec=local to export"
        )
    check_shapes(checkpoint, cfg)
    single = cfg.model_copy(update={"tensor_parallel": 1, "pipeline_parallel": 1})
    # float32 whatever the saved dtype: bf16 tensors (GPU runs) are cast exactly on load, and the check's
    # Megatron forward then runs in float32 like the HF one
    model = build_model(single, cpu_profile(single, bf16=False))
    template = model.sharded_state_dict()
    # raise_unexpected: a tensor the model needs but the checkpoint lacks is an error, not a silent init
    state = dist_checkpointing.load(template, str(checkpoint), strict="raise_unexpected")
    model.load_state_dict({k: state[k] for k in template}, strict=True)
    model.eval()
    return model


def megatron_logits(model: Any, tokens: Any) -> Any:
    """Logits ``[batch, seq, vocab]`` of the TP=1 model (float32 math) for ``tokens`` ``[batch, seq]``."""
    import torch

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


def hf_config(cfg: TrainConfig, arch: Arch, vocab_size: int, dtype: Dtype, bos: int | None, eos: int | None) -> Any:
    """``LlamaConfig`` / ``MistralConfig`` describing the same network (RoPE base, eps, GQA, untied)."""
    from transformers import LlamaConfig, MistralConfig

    m = cfg.model
    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_theta=float(m.rotary_base),
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        initializer_range=m.init_method_std,
    )
    if arch == "mistral":
        config = MistralConfig(**common, sliding_window=None)  # trained with full causal attention
    else:
        config = LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = dtype
    return config


# -- writing -------------------------------------------------------------------------------------------
def write_safetensors(tensors: dict[str, Any], folder: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """``model.safetensors`` (or numbered shards plus ``model.safetensors.index.json`` past ``shard_bytes``),
    split as ``huggingface_hub`` splits a state dict, written with ``safetensors``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # q/k/v are views of one buffer
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        write_json_atomic(folder / "model.safetensors.index.json", index)
    return list(split.filename_to_tensors)


def find_tokenizer(checkpoint: Path, cfg: TrainConfig, tokenizer: str | os.PathLike[str] | None) -> Path | None:
    """``tokenizer`` if given, else the copy the tokenize stage kept in ``RUN/tokens/<group>/tokenizer``."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not (folder / "tokenizer_config.json").exists() and not (folder / "tokenizer.json").exists():
            raise IptError(f"export: {folder} holds no Hugging Face tokenizer (tokenizer.json, tokenizer_config.json)")
        return Path(tokenizer)
    run = run_of(checkpoint)
    for group in cfg.data.groups:
        candidate = run.token_group(group) / "tokenizer" if run else None
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


def _training_bos(checkpoint: Path, cfg: TrainConfig) -> int | None:
    """BOS id the tokenize stage put before every training document (its manifests), or None."""
    run = run_of(checkpoint)
    for group in cfg.data.groups:
        manifest = run.token_group(group) / "manifest.json" if run else None
        if manifest is not None and manifest.exists():
            bos = read_json(manifest).get("config", {}).get("bos_id")
            if bos is not None:
                return int(bos)
    return None


def write_tokenizer(source: Path, folder: Path, bos_expected: int | None) -> tuple[Any, bool]:
    """Save the tokenizer into ``folder``; if training documents began with BOS, make sure the saved
    tokenizer adds it too (``add_special_tokens=True``, what lm-eval's ``add_bos_token=True`` asks for)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # any loader failure: name the folder
        raise IptError(f"export: cannot load the tokenizer in {source}: {exc}") from exc
    if bos_expected is not None and not _adds_bos(tok):
        from tokenizers import processors

        bos = tok.convert_ids_to_tokens(bos_expected)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_expected)]
        )
        if hasattr(tok, "add_bos_token"):
            tok.add_bos_token = True
    tok.save_pretrained(str(folder))
    saved = AutoTokenizer.from_pretrained(str(folder))
    adds = _adds_bos(saved)
    if bos_expected is not None and not adds:
        raise IptError(f"export: the tokenizer from {source} does not prepend BOS ({bos_expected}) even after patching")
    return saved, adds


def _adds_bos(tok: Any) -> bool:
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def probe_tokens(vocab: int, seq_length: int) -> Any:
    """Two fixed token sequences for the logit check (deterministic, spread over the vocabulary)."""
    import torch

    n = min(seq_length, 32)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, n), generator=g)


def verify(folder: Path, model: Any, tokens: Any, rows: int) -> float:
    """Max |logit difference| between the written HF folder and the Megatron model on ``tokens``."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        theirs = hf(tokens).logits.float()
    ours = megatron_logits(model, tokens)[..., :rows]
    return float((theirs - ours).abs().max())


def export(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    dtype: Dtype = "float32",
    arch: Arch = "llama",
    config: str | os.PathLike[str] | None = None,
    vocab: Literal["padded", "tokenizer"] = "padded",
    check: bool = True,
    force: bool = False,
    log: Any = print,
) -> ExportResult:
    """Convert one checkpoint into a Hugging Face model folder ``out`` (see the module docstring)."""
    import torch
    from transformers import GenerationConfig

    started = time.time()
    ckpt = find_checkpoint(checkpoint)
    cfg = train_config(ckpt, config)
    out = Path(out)
    if out.exists() and not force:
        raise IptError(f"export: {out} exists; remove it or pass --force to replace it")
    tok_dir = find_tokenizer(ckpt, cfg, tokenizer)
    if tok_dir is None and vocab == "tokenizer":
        raise IptError("export: --vocab tokenizer needs a tokenizer (--tokenizer DIR)")
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)  # an earlier failed export
    partial.mkdir(parents=True)
    try:
        tok, adds_bos = (None, None)
        if tok_dir is not None:
            tok, adds_bos = write_tokenizer(tok_dir, partial, _training_bos(ckpt, cfg))
        else:
            log(f"export: no tokenizer found for {ckpt} (RUN/tokens/<group>/tokenizer); writing the model only")
        rows = cfg.model.vocab_size
        if tok is not None:
            if len(tok) > rows:
                raise IptError(f"export: the tokenizer has {len(tok)} tokens, the model only {rows} embedding rows")
            if vocab == "tokenizer":
                rows = len(tok)
        with megatron_process():
            log(f"export: loading {ckpt} at TP=1 PP=1")
            saved_dtype = str(check_shapes(ckpt, cfg)).removeprefix("torch.")
            model = load_megatron(ckpt, cfg)
            target = torch.float32 if dtype == "float32" else torch.bfloat16
            if target != torch.float32:
                for p in model.parameters():  # the Megatron reference computes with the exported values
                    p.data = p.data.to(target).float()
            tensors = {k: v.to(target) for k, v in to_hf(model.state_dict(), cfg, rows).items()}
            bos = tok.bos_token_id if tok is not None else None
            eos = tok.eos_token_id if tok is not None else None
            hf = hf_config(cfg, arch, rows, dtype, bos, eos)
            hf.save_pretrained(str(partial))
            GenerationConfig.from_model_config(hf).save_pretrained(str(partial))
            write_safetensors(tensors, partial)
            diff = None
            if check:
                diff = verify(partial, model, probe_tokens(min(rows, len(tok) if tok else rows), cfg.seq_length), rows)
                log(f"export: max |HF - Megatron| logit difference on the probe tokens: {diff:.3g}")
                if not diff <= VERIFY_ATOL:
                    raise IptError(
                        f"export: the exported model's logits differ from the checkpoint's by {diff:.3g}"
                        f" (> {VERIFY_ATOL}); {partial} kept for inspection"
                    )
        meta = read_json(ckpt / "meta.json")
        result = ExportResult(
            out=str(out),
            checkpoint=str(ckpt.resolve()),
            iteration=int(meta["iteration"]),
            saved_layout={k: int(meta[k]) for k in ("tp", "pp", "dp") if k in meta},
            checkpoint_dtype=saved_dtype,
            arch=arch,
            dtype=dtype,
            vocab_size=rows,
            tokenizer_size=len(tok) if tok is not None else None,
            tokenizer_adds_bos=adds_bos,
            max_abs_logit_diff=diff,
            seconds=round(time.time() - started, 2),
        )
        write_json_atomic(partial / "export.json", asdict(result))
    except IptError as exc:
        if "kept for inspection" not in str(exc):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_folder(partial, out)  # --force replaces an earlier export
    return result
