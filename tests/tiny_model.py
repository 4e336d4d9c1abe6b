"""A tiny random-weight Llama synthesizer made locally (no hub): config + tokenizer trained in the test."""

from __future__ import annotations

from pathlib import Path

from tokenizer_fixture import train_tokenizer


def tiny_llama(folder: Path, max_positions: int = 512) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    train_tokenizer(folder, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder
