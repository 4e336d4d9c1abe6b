"""Configuration: YAML files validated on load, ``--set key=value`` overrides, stable hashes.

Unknown keys and wrong types are errors naming the file and the dotted key. Each stage hashes
only the sections that change its output, so e.g. a different executor does not invalidate shards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordsConfig(_Section):
    """How record files are written and how bad input records are handled."""

    level: int = Field(3, ge=1, le=22, description="zstd compression level")
    frame_bytes: int = Field(1 << 20, ge=4096, description="uncompressed bytes per zstd frame")
    fsync: bool = Field(True, description="fsync at close, at preemption and on a flush every sync_s (durability)")
    sync_s: float = Field(
        10.0, ge=0, description="a flush fsyncs once this many seconds passed since the last fsync (0: every flush)"
    )
    threads: int | None = Field(
        None, ge=0, le=64, description="frame compression threads per process (default: one per CPU, up to 4)"
    )
    on_bad_record: Literal["error", "quarantine"] = Field(
        "error", description="'error' stops at the first bad record; 'quarantine' sets it aside, counted"
    )


class ShardConfig(_Section):
    """The ``shard`` stage: raw corpus -> N balanced zstd JSONL shards."""

    inputs: list[str] = Field(default_factory=list, description="files, folders, globs or a hub dataset name")
    format: Literal["auto", "jsonl", "parquet", "arrow", "hub"] = "auto"
    text_field: str = Field("text", min_length=1, description="RefinedWeb calls it 'content'")
    id_field: str | None = Field(None, description="use the source's own id; default '<file>:<line>'")
    keep_fields: list[str] = Field(default_factory=list, description="extra source fields copied to 'meta'")
    num_shards: int = Field(8, ge=1, le=10_000_000)
    max_doc_bytes: int = Field(8 << 20, ge=1, description="larger documents are bad records")
    hub_split: str = "train"
    output_folder: str = Field(
        "raw", min_length=1, description="the stage's folder in the run (shard --out DIR: DIR's name)"
    )


class ServerConfig(_Section):
    """``synth.backend: server``: an OpenAI-compatible ``/v1/completions`` server (vLLM's), running or launched."""

    url: str | None = Field(None, description="a running server, http://host:port (many tasks may share it)")
    launch: bool = Field(False, description="each task starts vLLM's OpenAI server on a free loopback port")
    served_model: str | None = Field(None, description="the name the server serves (default: synth.model)")
    timeout_s: float = Field(600.0, gt=0, description="seconds per request")
    retries: int = Field(5, ge=0, description="retries of a busy or unreachable server (backoff with jitter)")
    concurrency: int | None = Field(
        None, ge=1, description="prompts in flight per task (default: synth.max_in_flight, else 256)"
    )
    prompts_per_request: int = Field(
        8, ge=1, description="prompts submitted together share a request (the server's CPU per request is amortised)"
    )
    startup_timeout_s: float = Field(
        900.0, gt=0, description="seconds a task waits for the server's /health (launch: and its model list)"
    )
    module: str = Field(
        "vllm.entrypoints.openai.api_server", min_length=1, description="launch: the server module python -m runs"
    )

    @model_validator(mode="after")
    def _one_mode(self) -> ServerConfig:
        if self.url and self.launch:
            raise ValueError("synth.server: url (a running server) or launch: true (one per task), not both")
        return self


class SynthConfig(_Section):
    """The ``synthesize`` stage: the instruction synthesizer's multi-round inference."""

    model: str | None = Field(None, description="synthesizer: a folder or hub name (instruction-synthesizer)")
    input_stage: str = Field("raw", description="run sub-folder of documents to synthesize from (raw, raw-clean)")
    backend: Literal["transformers", "vllm", "server"] = "transformers"
    server: ServerConfig = Field(default_factory=ServerConfig, description="server backend: url or launch")
    rounds: int = Field(2, ge=1, description="M: documents of a shard are split into M rounds")
    max_new_tokens: int = Field(400, ge=1)
    max_model_len: int = Field(4096, ge=16)
    too_long: Literal["truncate", "skip"] = Field("truncate", description="documents over the token budget")
    pair_rules: Literal["reference", "strict"] = Field(
        "reference", description="parsing of generations: the reference's rules; strict also drops empty questions"
    )
    chunk_docs: int = Field(64, ge=1, description="records per durable chunk (flushed after each)")
    max_in_flight: int | None = Field(
        None, ge=1, description="documents submitted ahead of the oldest unwritten one (default: the engine's bound)"
    )
    batch_size: int = Field(8, ge=1, description="transformers backend: prompts per generate call")
    keep_raw: bool = Field(False, description="keep the raw generation text in each record")
    device: str = Field("auto", description="transformers backend: auto, cpu, cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm backend: share of GPU memory it reserves (CPU build: share of RAM)"
    )
    vllm_args: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="more vllm.LLM arguments, e.g. {max_num_seqs: 512, enforce_eager: true}"
    )
    convert_share: float = Field(
        1.0, gt=0, le=1, description="share of raw documents sent to synthesis, chosen by id (paper: see recipe)"
    )
    select_seed: int = Field(0, description="seed of the by-id choice of documents to convert")
    no_repeat_ngram_size: int = Field(0, ge=0, description="transformers: ban repeating n-grams of the answer; 0: off")
    repetition_penalty: float = Field(1.0, gt=0, description="transformers and vllm; 1.0: off (the paper's greedy)")


class TemplifyConfig(_Section):
    """The ``templify`` stage: synthesized records -> instruction-augmented pre-training texts."""

    input_stage: str = Field("synth", description="run sub-folder holding synthesize records")
    output_folder: str = Field("augmented", description="run sub-folder to write")
    raw_stage: str | None = Field(
        "raw", description="documents of these shards not sent to synthesis become texts of the raw group; null: none"
    )
    seed: int = Field(0, description="global seed of the per-record format draw")
    malformed: Literal["drop", "keep"] = Field(
        "drop", description="pairs not in the reasoning/options shape they claim: drop (the reference) or keep as open"
    )


class MixGroup(_Section):
    """One token group of the blend: ``repeat`` (epochs relative to the others) or a fixed ``share``."""

    repeat: float | None = Field(None, gt=0, description="weight proportional to tokens x repeat (default 1)")
    share: float | None = Field(None, gt=0, le=1, description="fixed share of the training tokens")

    @model_validator(mode="after")
    def _one_of(self) -> MixGroup:
        if self.repeat is not None and self.share is not None:
            raise ValueError("give either repeat or share, not both")
        return self


class MixtureConfig(_Section):
    """The pre-training mixture over token groups (RUN/tokens/<group>), as Megatron blend weights."""

    groups: dict[str, MixGroup] = Field(
        default_factory=lambda: {"augmented": MixGroup(), "raw": MixGroup()},
        description="group name -> {repeat: R} or {share: S}",
    )
    train_tokens: int | None = Field(None, ge=1, description="planned training tokens (reports epochs per group)")


class DecontaminateConfig(_Section):
    """The ``decontaminate`` stage: benchmark items (the eval tasks' documents) out of the training texts."""

    enabled: bool = Field(
        False,
        description="pipeline: decontaminate the raw shards before synthesis and the synthesized pairs after it",
    )
    input_stage: str = Field("raw", description="run sub-folder to read: raw (before synthesis) or synth")
    output_folder: str | None = Field(None, description="run sub-folder to write (default: <input_stage>-clean)")
    group: str | None = Field(
        None, description="whose policy applies: augmented for the synth folder, raw otherwise (default)"
    )
    tasks: list[str] | None = Field(None, description="lm-eval tasks to look for (default: every task of eval.groups)")
    references: list[str] = Field(
        default_factory=list, description="more texts to look for: JSON Lines or Parquet files with a text field"
    )
    reference_text_field: str = Field("text", min_length=1)
    n: int = Field(13, ge=1, description="words per n-gram (GPT-3 and lm-eval's janitor: 13)")
    min_words: int = Field(8, ge=1, description="an eval text shorter than n words is looked for whole if this long")
    lowercase: bool = True
    nfkc: bool = Field(True, description="Unicode NFKC before matching (full-width letters, ligatures, odd spaces)")
    punctuation: Literal["unicode", "ascii", "keep"] = Field(
        "unicode", description="characters deleted before matching: Unicode punctuation and symbols, ASCII's, none"
    )
    policy: dict[str, Literal["flag", "drop_pair", "excise", "drop_doc"]] = Field(
        default_factory=lambda: {"augmented": "drop_pair", "raw": "excise"},
        description="per group: flag (log only), drop_pair, excise (lm-eval's janitor rule), drop_doc",
    )
    excise_window: int = Field(200, ge=0, description="characters cut either side of a match")
    excise_min_piece: int = Field(200, ge=0, description="pieces this short or shorter are dropped")
    excise_max_hits: int = Field(10, ge=0, description="a text with more matches is dropped")


class TokenizeConfig(_Section):
    """The ``tokenize`` stage: zstd JSONL -> Megatron indexed datasets (one group per input stage)."""

    tokenizer: str | None = Field(None, description="tokenizer folder, tokenizer.json's folder, or hub name")
    input_stage: str = Field("augmented", description="run sub-folder to read: raw, synth, augmented, ...")
    group: str | None = Field(None, description="output group name (default: the input stage's folder)")
    text_field: str = "text"
    prepend_bos: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: BOS when the tokenizer adds one itself (Llama, Mistral)"
    )
    append_eod: bool = Field(True, description="EOD (the tokenizer's EOS) after each document")
    dtype: Literal["auto", "uint16", "int32"] = "auto"
    empty_text: Literal["error", "skip", "keep"] = "error"
    workers: int | None = Field(None, ge=1, description="tokenizer processes per task (default: cpus_per_task)")
    batch_docs: int = Field(
        256, ge=1, description="documents per batch sent to a tokenizer process (when the main process reads a shard)"
    )
    record_group: str | None = Field(
        None, description="only records whose 'group' field is this (templify writes augmented and raw)"
    )


class SlurmConfig(_Section):
    """Slurm job parameters (the execution layer passes them to submitit's SlurmExecutor)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(240, ge=1, description="time limit of one array task, minutes")
    cpus_per_task: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    mem_gb: float | None = Field(None, gt=0)
    constraint: str | None = None
    signal_delay_s: int = Field(120, ge=1, description="warning signal (USR2) this long before the time limit")
    extra_sbatch: dict[str, bool | int | str] = Field(
        default_factory=dict, description="more #SBATCH options, e.g. {exclude: node[01-02]}; true for a flag"
    )
    setup: list[str] = Field(default_factory=list, description="shell lines before the task, e.g. 'module load cuda'")


class ExecutionConfig(_Section):
    """Where and how tasks run (the execution layer reads this; stages never do)."""

    backend: Literal["local", "debug", "slurm"] = Field(
        "local", description="local: submitit worker processes; slurm: job arrays; debug: in-process"
    )
    workers: int | None = Field(None, ge=1, description="local worker processes (default: CPU count)")
    timeout_min: int = Field(24 * 60, ge=1, description="local backend: time limit of one worker")
    shards_per_task: int = Field(1, ge=1, description="shards packed into one array task (model loaded once)")
    parallelism: int | None = Field(None, ge=1, description="at most this many array tasks at once (%P)")
    max_array_size: int | None = Field(None, ge=1, description="default: the cluster's MaxArraySize")
    max_attempts: int = Field(10, ge=1, description="attempts per shard (preemptions included) before it fails")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class EvalGroup(_Section):
    """One lm-eval invocation: tasks (names, groups or tags) evaluated with one few-shot setting."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names (or YAML paths)")
    num_fewshot: int | None = Field(None, ge=0, description="None: each task's own default")


def _model_card_groups() -> dict[str, EvalGroup]:
    """The two lm-eval commands of the InstructLM model cards (zero-shot and five-shot)."""
    return {
        "zero_shot": EvalGroup(tasks=["piqa", "hellaswag", "winogrande"], num_fewshot=0),
        "five_shot": EvalGroup(tasks=["social_iqa", "ai2_arc", "openbookqa", "boolq", "mmlu"], num_fewshot=5),
    }


class EvalConfig(_Section):
    """The ``eval`` stage: lm-evaluation-harness on a Hugging Face model, as the model card runs it."""

    model: str | None = Field(None, description="Hugging Face model folder (RUN/hf) or hub name")
    groups: dict[str, EvalGroup] = Field(default_factory=_model_card_groups, description="name -> tasks, shots")
    batch_size: int | str = Field("auto", description="an int, 'auto' or 'auto:N' (lm-eval's --batch_size)")
    max_batch_size: int | None = Field(None, ge=1, description="cap for batch_size auto (lm-eval's default: 64)")
    dtype: str = Field("float16", description="model card: float16; use float32 on CPU")
    device: str | None = Field(None, description="cuda, cuda:0, cpu; default: cuda when available, else cpu")
    add_bos_token: bool = Field(True, description="the InstructLM models need BOS (lm-eval's default is off)")
    require_bos: bool = Field(True, description="refuse a tokenizer that does not prepend BOS when asked")
    model_args: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="more HFLM arguments, e.g. {max_length: 2048}"
    )
    limit: int | float | None = Field(None, gt=0, description="documents per task (a fraction if < 1); tests only")
    include_path: list[str] = Field(default_factory=list, description="folders of custom task YAMLs")
    out: str | None = Field(None, description="output folder (default: RUN/eval)")
    seed: list[int | None] = Field(
        default_factory=lambda: [0, 1234, 1234, 1234],
        min_length=4,
        max_length=4,
        description="random, numpy, torch, few-shot seeds (lm-eval's CLI defaults)",
    )
    log_samples: bool = Field(False, description="keep per-document outputs (RUN/eval/<group>.samples.json)")


class FinetuneSynthConfig(_Section):
    """The ``finetune-synthesizer`` stage: a causal LM fine-tuned on context -> pairs examples."""

    data: str | None = Field(None, description="JSON Lines of {id, context, pairs: [{Q, A}]} to train on")
    heldout: str | None = Field(None, description="same format; contexts for the parse rate after training")
    base: str | None = Field(None, description="model folder to fine-tune; none: a small Llama from scratch")
    out: str | None = Field(None, description="output folder (written as OUT.partial, then renamed)")
    seed: int = 0
    steps: int | None = Field(None, ge=1, description="optimizer steps (the LR schedule spans them)")
    max_minutes: float | None = Field(
        None, gt=0, description="stop cleanly after this long (schedule by time if no steps)"
    )
    vocab_size: int = Field(3072, ge=300, description="from scratch: byte-level BPE trained on the data")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    max_positions: int = Field(1024, ge=64, description="from scratch: the model's positions (synth.max_model_len)")
    seq_len: int = Field(1024, ge=32, description="tokens per training sequence (examples packed, few-shot style)")
    pack: int = Field(2, ge=1, description="at most this many examples per sequence (BOS ctx pairs EOS, chained)")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    eval_contexts: int = Field(100, ge=0, description="held-out contexts generated after training (0: none)")
    eval_max_new_tokens: int = Field(128, ge=1)
    eval_batch_size: int = Field(8, ge=1)


# -- train: model shape, batch, schedule, parallelism, data, saves --------------------------------------
class ModelConfig(_Section):
    """A Llama/Mistral-style decoder: RMSNorm, SwiGLU, RoPE, optional GQA, untied embeddings, no biases."""

    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=1)
    ffn_hidden_size: int = Field(172, ge=1, description="SwiGLU inner size (Llama: ~8/3 * hidden, rounded)")
    num_attention_heads: int = Field(4, ge=1)
    num_query_groups: int | None = Field(None, ge=1, description="GQA key/value heads (None: = attention heads)")
    vocab_size: int = Field(512, ge=2, description="embedding rows; must cover the tokenizer (pad to a multiple)")
    rotary_base: int = Field(10000, ge=1)
    norm_epsilon: float = Field(1e-5, gt=0)
    init_method_std: float = Field(0.02, gt=0)


class DataConfig(_Section):
    """Which tokenized groups of the run to blend: ``RUN/tokens/<group>.{bin,idx}`` with weights."""

    groups: dict[str, float] = Field(
        default_factory=lambda: {"augmented": 1.0}, description="group name -> blend weight (normalised)"
    )
    mixture: bool = Field(
        False, description="take groups and weights from RUN/mixture.json (the mixture report) instead of groups"
    )
    eod_id: int | None = Field(None, description="end-of-document id (default: from the group's manifest)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")


class TrainConfig(_Section):
    """Pre-training with Megatron-Core (the ``train`` stage)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    seq_length: int = Field(64, ge=8)
    micro_batch_size: int = Field(4, ge=1)
    global_batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all ranks together")
    train_iters: int = Field(40, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    lr_warmup_iters: int = Field(0, ge=0)
    lr_decay_iters: int | None = Field(None, ge=1, description="cosine decay length (default: train_iters)")
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = Field(1.0, ge=0, description="max global grad norm (0: no clipping)")
    seed: int = 1234
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="cuda: every rank needs a GPU (training refuses to start without one); cpu: gloo, tests"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on cuda, fp32 on cpu")
    distributed_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="shard optimizer state over data-parallel ranks (auto: on with device cuda)"
    )
    layer_spec: Literal["local", "transformer_engine", "auto"] = Field(
        "local",
        description="Megatron-Core layer spec: local (plain PyTorch), transformer_engine (fused kernels, needs TE"
        " and CUDA), auto (TE when importable)",
    )
    attention: Literal["sdpa", "unfused"] = Field(
        "sdpa",
        description="core attention of the local layer spec: sdpa (PyTorch's scaled_dot_product_attention: flash,"
        " cuDNN or memory-efficient kernels) or unfused (Megatron-Core's DotProductAttention, the full score matrix)",
    )
    fusions: Literal["auto", "on", "off"] = Field(
        "auto",
        description="the fusions that run without Transformer Engine or apex (SwiGLU through torch.compile, the"
        " native fused cross-entropy); auto: on with device cuda",
    )
    rope_fusion: Literal["auto", "off", "compiled"] = Field(
        "auto",
        description="RoPE of the local spec: compiled (torch.compile of Megatron-Core's eager RoPE; its own"
        " apply_rope_fusion needs Transformer Engine), off, or auto (compiled where train.fusions is on)",
    )
    recompute_activations: bool = Field(False, description="full activation recomputation (saves memory)")
    log_interval: int = Field(1, ge=1, description="iterations per log line (loss, lr, grad norm, tokens/s, MFU)")
    save_interval: int | None = Field(None, ge=1, description="periodic checkpoint every N iterations")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept (older ones are deleted)")
    final_save: bool = Field(True, description="save a checkpoint when train_iters is reached (benchmarks: false)")
    torch_profile_step: int | None = Field(
        None,
        ge=1,
        description="profile this iteration with torch.profiler: RUN/train/torch-profile-<N>.txt (top kernels by"
        " self time) and .json (rank 0)",
    )
    exit_duration_min: float | None = Field(None, gt=0, description="save and exit after this many minutes")
    exit_signal: str = Field("USR1", description="Slurm's warning signal name (sbatch --signal=B:NAME@delay)")
    signal_delay_s: int = Field(120, ge=1, description="warning signal this long before the time limit")
    nodes: int = Field(1, ge=1, description="Slurm nodes")
    ranks_per_node: int = Field(1, ge=1, description="rank processes per node (one per GPU)")
    init_from_hf: str | None = Field(
        None,
        description="Hugging Face Llama/Mistral folder to start from (continual pre-training): imported as the run's"
        " first checkpoint iter_0000000 (model only) when the run has none; later resumes use the run's checkpoints",
    )
    peak_flops: float = Field(989e12, gt=0, description="per-device peak for MFU (H100 SXM dense bf16: 989 TFLOP/s)")

    @field_validator("distributed_optimizer", "fusions", mode="before")
    @classmethod
    def _on_off(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted on/off (in a config file or --set train.distributed_optimizer=on) as a bool
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        m = self.model
        if m.num_attention_heads % self.tensor_parallel:
            raise ValueError(f"model.num_attention_heads {m.num_attention_heads} not divisible by tensor_parallel")
        if m.hidden_size % m.num_attention_heads:
            raise ValueError("model.hidden_size must be a multiple of model.num_attention_heads")
        if m.num_query_groups and m.num_attention_heads % m.num_query_groups:
            raise ValueError("model.num_attention_heads must be a multiple of model.num_query_groups")
        if m.num_layers % self.pipeline_parallel:
            raise ValueError(f"model.num_layers {m.num_layers} not divisible by pipeline_parallel")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        if not self.data.groups:
            raise ValueError("data.groups: name at least one tokenized group")
        return self

    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


class PlanConfig(_Section):
    """``plan``: prices and margins of the cost and layout estimate made before submitting."""

    gpu_hour_price: float | None = Field(None, ge=0, description="price of one GPU-hour (cost column when set)")
    cpu_hour_price: float | None = Field(None, ge=0, description="price of one CPU core-hour")
    currency: str = Field("USD", min_length=1)
    time_margin: float = Field(
        0.25, ge=0, lt=1, description="share of execution.slurm.time_min kept free when packing shards into a task"
    )
    calibrate_train_iters: int = Field(30, ge=2, description="iterations of the short training calibration run")
    calibrate_eval_limit: int | None = Field(
        None,
        ge=1,
        description="documents per eval task in the calibration; null: all (the eval's exact cost, which does not"
        " depend on training). A limit's time is scaled up by the task sizes, its fixed start-up too",
    )


class PublishConfig(_Section):
    """The ``publish`` stage: a run's record shards -> a Hugging Face dataset folder (Parquet + card)."""

    out: str | None = Field(None, description="dataset folder to write (one sub-folder per published part)")
    what: list[Literal["augmented", "synth", "raw"]] = Field(
        default_factory=lambda: ["augmented", "synth"], min_length=1, description="parts to publish, one config each"
    )
    part: Literal["augmented", "synth", "raw"] = Field(
        "augmented", description="the part one stage run publishes (set per part by the publish command)"
    )
    repo_id: str | None = Field(None, description="hub dataset repository (ORG/NAME) for --push and the card")
    license: str = Field("other", description="the card's license (a hub license id, e.g. odc-by, cc-by-4.0)")
    language: list[str] = Field(default_factory=lambda: ["en"], description="the card's languages (ISO 639-1)")
    pretty_name: str | None = Field(None, description="the card's title (default: the run folder's name)")
    row_group_rows: int = Field(1000, ge=1, description="rows per Parquet row group (streaming reads one at a time)")
    row_group_bytes: int = Field(
        64 << 20, ge=1 << 16, description="a row group is also cut once its text reaches this many bytes"
    )
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class Config(_Section):
    """The whole configuration of a run."""

    records: RecordsConfig = Field(default_factory=RecordsConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    templify: TemplifyConfig = Field(default_factory=TemplifyConfig)
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune_synth: FinetuneSynthConfig = Field(default_factory=FinetuneSynthConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{origin}: malformed key {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: key {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML, so 3 is an int and [a, b] a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set shard.num_shards=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def _format_errors(exc: ValidationError, origin: str, overridden: set[str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = "--set" if key in overridden else origin
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: key '{key}': {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    """Load and validate a config file, then apply ``--set`` overrides and CLI-flag values."""
    tree: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read config ({exc.strerror})") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{origin}: the top level must be a mapping of sections")
        tree = loaded or {}
    overridden: set[str] = set()
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, "--set")
        overridden.add(key)
    for key, value in (extra or {}).items():
        _set_dotted(tree, key, value, "command line")
        overridden.add(key)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, overridden)) from None


def config_hash(data: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able config fragment (key order does not matter)."""
    blob = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def data_hash(cfg: Config) -> str:
    """A hash of every config section that can decide data: not where tasks run (``execution``), the
    plan's prices and margins (``plan``), or where ``publish`` writes (the plan and the dataset card
    state it)."""
    return config_hash(
        cfg.model_dump(mode="json", exclude={"execution": True, "plan": True, "publish": {"part", "out"}})
    )
