"""A small byte-level BPE tokenizer trained on the fly (no hub), saved as a Hugging Face fast tokenizer."""

from __future__ import annotations

from pathlib import Path

from conftest import make_docs


def train_tokenizer(folder: Path, vocab_size: int = 600, add_bos: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([d["content"] for d in make_docs(400, seed=11)], trainer=trainer)
    if add_bos:  # like Llama/Mistral: the tokenizer itself prepends BOS
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return folder
