"""The tokenizer worker processes of ``tokenize`` (kept apart so that spawned workers import little)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, bos: int | None, eod: int | None, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_file(tokenizer_json), bos=bos, eod=eod, dtype=np.dtype(dtype))


def _encode(texts: list[str]) -> tuple[bytes, bytes]:
    """Token ids of a batch, concatenated, and the per-document lengths (as raw bytes, cheap to send)."""
    w = _WORKER
    encodings = w["tok"].encode_batch_fast(texts, add_special_tokens=False)
    bos, eod = w["bos"], w["eod"]
    head = bos is not None
    lengths = np.fromiter(map(len, encodings), dtype=np.int32, count=len(encodings))
    lengths += head + (eod is not None)
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=w["dtype"])
    for pos, enc in zip((starts + head).tolist(), encodings, strict=True):  # numpy copies each id list in C
        ids = enc.ids
        flat[pos : pos + len(ids)] = ids
    if head:
        flat[starts] = bos
    if eod is not None:
        flat[ends - 1] = eod
    return flat.tobytes(), lengths.tobytes()
