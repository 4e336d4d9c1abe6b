"""The model: Megatron-Core's ``GPTModel`` with a Llama/Mistral-style spec, built for this rank's
tensor/pipeline slice, then wrapped in Megatron's ``DistributedDataParallel``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import TrainConfig
from .attention import sdpa_attention_class
from .profile import Profile


def transformer_config(cfg: TrainConfig, profile: Profile, *, initialize: bool = True):
    """Megatron's ``TransformerConfig`` for a Llama-style decoder (RMSNorm, SwiGLU, no biases, no dropout).

    Every GPU/CPU difference comes from ``profile`` (see :mod:`.profile`), never from the machine.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = cfg.model
    bf16 = profile.bf16
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU = silu(x W1) * (x W3)
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        sequence_parallel=profile.sequence_parallel,
        use_cpu_initialization=profile.use_cpu_initialization,
        perform_initialization=initialize,  # False: weights are loaded next (a Hugging Face import)
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        bias_activation_fusion=profile.swiglu_fusion,  # SwiGLU through torch.compile; needs no bias (profile.py)
        cross_entropy_loss_fusion=profile.cross_entropy_fusion,
        cross_entropy_fusion_impl="native",  # torch.compile'd; "te" needs Transformer Engine
        masked_softmax_fusion=profile.masked_softmax_fusion,  # apex's kernel; off, see profile.py
        attention_softmax_in_fp32=True,
        gradient_accumulation_fusion=False,  # needs apex's fused_weight_gradient_mlp_cuda
        apply_rope_fusion=profile.rope_fusion == "transformer_engine",  # TE's kernel; "compiled": see layer_spec
        persist_layer_norm=False,
        recompute_granularity="full" if cfg.recompute_activations else None,
        recompute_method="uniform" if cfg.recompute_activations else None,
        recompute_num_layers=1 if cfg.recompute_activations else None,
        batch_p2p_comm=profile.batch_p2p,
        batch_p2p_sync=profile.batch_p2p,
    )


def _seeded_layer_class(seed: int, layers_per_stage: int):
    """``TransformerLayer`` that seeds the RNG with its global layer number before creating its weights.

    Megatron initialises weights in construction order, so a pipeline stage that starts at layer 5
    would otherwise draw layer 5 from the RNG state of layer 1. Seeding per layer makes the initial
    model the same for every pipeline (and, with CPU initialisation, tensor) split.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class SeededTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
            offset = parallel_state.get_pipeline_model_parallel_rank() * layers_per_stage
            torch.manual_seed(seed + offset + layer_number)
            super().__init__(config, submodules, layer_number=layer_number, **kwargs)

    return SeededTransformerLayer


def layer_spec(profile: Profile):
    """Megatron-Core's layer spec for the profile: Transformer Engine's fused layers, or plain PyTorch with
    the profile's core attention (SDPA or Megatron's unfused ``DotProductAttention``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if profile.layer_spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if profile.attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = sdpa_attention_class()
    if profile.rope_fusion == "compiled":
        compile_rope()
    return spec


def compile_rope() -> None:
    """Megatron-Core's eager RoPE (``rope_utils._apply_rotary_pos_emb_bshd``: cos, sin, rotate-half, two
    multiplies and a concat, each a kernel) replaced by its ``torch.compile``d self, once per process.

    The function is looked up as a module global at each call, so the replacement reaches every attention
    layer; the maths is Megatron's own. Megatron's ``apply_rope_fusion`` would import Transformer Engine.
    """
    from megatron.core.models.common.embeddings import rope_utils

    if not getattr(rope_utils._apply_rotary_pos_emb_bshd, "_ipt_compiled", False):
        compiled = torch.compile(rope_utils._apply_rotary_pos_emb_bshd, dynamic=False)
        compiled._ipt_compiled = True
        rope_utils._apply_rotary_pos_emb_bshd = compiled


def build_model(cfg: TrainConfig, profile: Profile, *, initialize: bool = True, device: str = "cpu"):
    """This rank's ``GPTModel`` chunk (first stage has the embedding, last the output layer), on ``device``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    tc = transformer_config(cfg, profile, initialize=initialize)
    spec = layer_spec(profile)
    spec.module = _seeded_layer_class(cfg.seed, cfg.model.num_layers // cfg.pipeline_parallel)
    torch.manual_seed(cfg.seed)  # the embedding (first stage)
    model = GPTModel(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
    )
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model


def wrap_ddp(model, cfg: TrainConfig, *, use_distributed_optimizer: bool):
    """Megatron DDP: contiguous grad buffers, all-reduce (or reduce-scatter) over data-parallel ranks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def flops_per_token(cfg: TrainConfig) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), attention included (no recompute)."""
    m = cfg.model
    h, f, s, L = m.hidden_size, m.ffn_hidden_size, cfg.seq_length, m.num_layers
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * 3 * h * f + 2 * 2 * s * h  # qkvo, swiglu, scores+values
    return 3 * (L * per_layer + 2 * h * m.vocab_size)


def num_parameters(cfg: TrainConfig) -> int:
    """Parameters of the whole model (all ranks), for the log."""
    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return m.num_layers * per_layer + 2 * m.vocab_size * h + h
