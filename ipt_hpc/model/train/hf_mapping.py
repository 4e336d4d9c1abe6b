"""The Hugging Face Llama/Mistral <-> Megatron-Core ``GPTModel`` weight mapping, both directions.

``export`` writes a Hugging Face folder with :func:`to_hf`; ``train.init_from_hf`` imports one with
:func:`from_hf` (after :func:`expected_shapes` checks it fits ``train.model``). Only the local layer
spec's tensor names (TP=1 state dict) are mapped; ``tests/test_train_init.py`` round-trips both ways.
"""

from __future__ import annotations

from typing import Any

from ...config import TrainConfig
from ...errors import IptError


def to_hf(megatron: dict[str, Any], cfg: TrainConfig, vocab_rows: int | None = None) -> dict[str, Any]:
    """Hugging Face Llama/Mistral tensors from a TP=1 ``GPTModel`` state dict.

    ``linear_qkv`` rows are grouped per query group: the group's query heads, then its key head, then
    its value head (``get_query_key_value_tensors``). ``linear_fc1`` is ``[gate; up]`` (SwiGLU's
    ``silu(x W_gate) * (x W_up)``). ``vocab_rows`` keeps the first rows of the (padded) vocabulary.
    """
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head, hidden, ffn = m.hidden_size // heads, m.hidden_size, m.ffn_hidden_size
    per_group = heads // groups
    rows = vocab_rows or m.vocab_size
    out = {
        "model.embed_tokens.weight": megatron["embedding.word_embeddings.weight"][:rows],
        "model.norm.weight": megatron["decoder.final_layernorm.weight"],
        "lm_head.weight": megatron["output_layer.weight"][:rows],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = megatron[src + "self_attention.linear_qkv.weight"].view(groups, per_group + 2, head, hidden)
        fc1 = megatron[src + "mlp.linear_fc1.weight"]
        out |= {
            dst + "input_layernorm.weight": megatron[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(heads * head, hidden),
            dst + "self_attn.k_proj.weight": qkv[:, per_group].reshape(groups * head, hidden),
            dst + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(groups * head, hidden),
            dst + "self_attn.o_proj.weight": megatron[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": megatron[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": fc1[:ffn],
            dst + "mlp.up_proj.weight": fc1[ffn:],
            dst + "mlp.down_proj.weight": megatron[src + "mlp.linear_fc2.weight"],
        }
    return out


def expected_shapes(cfg: TrainConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes for ``train.model`` with ``vocab`` embedding rows."""
    m = cfg.model
    h, head, groups = m.hidden_size, m.hidden_size // m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (m.num_attention_heads * head, h),
            p + "self_attn.k_proj.weight": (groups * head, h),
            p + "self_attn.v_proj.weight": (groups * head, h),
            p + "self_attn.o_proj.weight": (h, m.num_attention_heads * head),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (m.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (m.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, m.ffn_hidden_size),
        }
    return out


def from_hf(hf: dict[str, Any], cfg: TrainConfig, source: str = "the checkpoint") -> dict[str, Any]:
    """A TP=1 ``GPTModel`` state dict from Hugging Face Llama/Mistral tensors (the inverse of :func:`to_hf`).

    ``linear_qkv`` rows are grouped per query group (its query heads, its key head, its value head);
    ``linear_fc1`` is ``[gate; up]``; embedding and output rows are zero-padded to ``train.model.vocab_size``.
    """
    import torch

    m = cfg.model
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer in old checkpoints
    if "lm_head.weight" not in hf:
        raise IptError(f"train.init_from_hf: {source} has no lm_head.weight (tied embeddings); untied ones are needed")
    if "model.embed_tokens.weight" not in hf:
        raise IptError(f"train.init_from_hf: {source} has no model.embed_tokens.weight; is it a Llama/Mistral model?")
    vocab = hf["model.embed_tokens.weight"].shape[0]
    if vocab > m.vocab_size:
        raise IptError(
            f"train.init_from_hf: {source} has {vocab} embedding rows, train.model.vocab_size {m.vocab_size}"
        )
    expected = expected_shapes(cfg, vocab)
    missing, extra = sorted(expected.keys() - hf.keys()), sorted(hf.keys() - expected.keys())
    if missing or extra:
        raise IptError(
            f"train.init_from_hf: {source} does not have the tensors of train.model"
            f" (missing: {missing[:4] or 'none'}; unexpected: {extra[:4] or 'none'}); check num_layers and biases"
        )
    for name, shape in expected.items():
        if tuple(hf[name].shape) != shape:
            raise IptError(
                f"train.init_from_hf: {source}: {name} has shape {tuple(hf[name].shape)}, train.model expects {shape}"
            )

    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head, hidden = m.hidden_size // heads, m.hidden_size

    def padded(t: Any) -> Any:
        out = t.new_zeros(m.vocab_size, hidden)  # rows past the tokenizer: never seen in the data
        out[:vocab] = t
        return out

    out = {
        "embedding.word_embeddings.weight": padded(hf["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": padded(hf["lm_head.weight"]),
    }
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].view(groups, heads // groups, head, hidden)
        k = hf[src + "self_attn.k_proj.weight"].view(groups, 1, head, hidden)
        v = hf[src + "self_attn.v_proj.weight"].view(groups, 1, head, hidden)
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out |= {
            dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
            dst + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, hidden),
            dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
            dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
            dst + "mlp.linear_fc1.weight": torch.cat([gate, up]),
            dst + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
        }
    return out
