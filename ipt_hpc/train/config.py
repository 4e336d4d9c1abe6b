"""The ``train`` section of a run's configuration: model shape, batch, schedule, parallelism, data, saves."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    recompute_activations: bool = Field(False, description="full activation recomputation (saves memory)")
    log_interval: int = Field(1, ge=1, description="iterations per log line (loss, lr, grad norm, tokens/s, MFU)")
    save_interval: int | None = Field(None, ge=1, description="periodic checkpoint every N iterations")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept (older ones are deleted)")
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

    @field_validator("distributed_optimizer", mode="before")
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
