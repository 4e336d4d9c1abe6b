"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) exactly as megatron-core's
``IndexedDataset`` reads them, written with vectorised numpy (no per-document Python work).

``.idx`` layout (little endian): ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B``,
sequence count ``<Q``, document count ``<Q``, sequence lengths ``int32[n]``, sequence byte pointers
``int64[n]``, document indices ``int64[d]`` (``[0, 1, ..., n]``: one sequence per document here).
``.bin`` is the concatenated token ids. Both are written as ``.partial`` files and renamed, ``.bin``
first: a dataset whose ``.idx`` exists is complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .atomic import fsync_dir, partial_path
from .errors import IptError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.int64): 5}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
UINT16_MAX_VOCAB = 65500  # megatron-core's own threshold (DType.optimal_dtype)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as megatron-core chooses), else int32."""
    return np.dtype(np.uint16) if vocab_size < UINT16_MAX_VOCAB else np.dtype(np.int32)


def paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)`` (a dot in the prefix is kept, unlike ``Path.with_suffix``)."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


class IndexedWriter:
    """Streaming writer of one indexed dataset: ``add(ids, lengths)`` appends documents."""

    def __init__(self, prefix: str | os.PathLike[str], dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.bin_path, self.idx_path = paths(self.prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(partial_path(self.bin_path), "wb")  # noqa: SIM115 - closed in close()/discard()
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids and per-document lengths."""
        if int(lengths.sum()) != len(ids):
            raise ValueError("lengths do not add up to the number of ids")
        self._bin.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += len(ids)

    def close(self) -> dict[str, int]:
        """fsync and rename ``.bin``, then write the ``.idx`` (the completion point)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(partial_path(self.bin_path), self.bin_path)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        write_index(self.idx_path, lengths, self.dtype)
        fsync_dir(self.prefix.parent)
        return {"documents": self.documents, "tokens": self.tokens, "bin_bytes": self.bin_path.stat().st_size}

    def discard(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        partial_path(self.bin_path).unlink(missing_ok=True)


def write_index(path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
    """Write a ``.idx`` for one-sequence documents of the given lengths (atomically)."""
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    documents = np.arange(n + 1, dtype=np.int64)
    tmp = partial_path(path)
    with open(tmp, "wb") as fh:
        fh.write(HEADER)
        fh.write(struct.pack("<Q", VERSION))
        fh.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype)]))
        fh.write(struct.pack("<Q", n))
        fh.write(struct.pack("<Q", n + 1))
        fh.write(np.asarray(lengths, dtype=np.int32).tobytes())
        fh.write(pointers.tobytes())
        fh.write(documents.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_index(path: str | os.PathLike[str]) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """``(dtype, sequence lengths, pointers, document indices)`` of a ``.idx`` (memory-mapped)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(len(HEADER) + 8 + 1 + 8 + 8)
    if head[: len(HEADER)] != HEADER:
        raise IptError(f"{path}: not a Megatron indexed dataset index (bad header)")
    off = len(HEADER)
    (version,) = struct.unpack_from("<Q", head, off)
    (code,) = struct.unpack_from("<B", head, off + 8)
    n, d = struct.unpack_from("<QQ", head, off + 9)
    if version != VERSION or code not in CODE_DTYPES:
        raise IptError(f"{path}: unsupported index version {version} or dtype code {code}")
    start = off + 9 + 16
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    lengths = mm[start : start + 4 * n].view(np.int32)
    pointers = mm[start + 4 * n : start + 12 * n].view(np.int64)
    docs = mm[start + 12 * n : start + 12 * n + 8 * d].view(np.int64)
    return CODE_DTYPES[code], lengths, pointers, docs


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    """Append ``size`` bytes of ``src`` to ``dst``: in the kernel where it can (``copy_file_range``:
    no copy through this process, a reflink on file systems that share extents), else by reading."""
    dst.flush()
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), left)
            if n == 0:
                break
            left -= n
    except OSError:  # not supported here (old kernel, some network file systems): copy what is left
        pass
    if left:
        src.seek(size - left)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 16 << 20)


def merge(prefixes: Sequence[str | os.PathLike[str]], out_prefix: str | os.PathLike[str]) -> dict[str, int]:
    """Concatenate indexed datasets into one (streaming copy of ``.bin``; no re-tokenization)."""
    if not prefixes:
        raise IptError("merge: no dataset to merge")
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = paths(out)
    idx_path.unlink(missing_ok=True)  # the old index must not describe the new .bin
    dtype = None
    all_lengths = []
    with open(partial_path(bin_path), "wb") as dst:
        for prefix in prefixes:
            p_bin, p_idx = paths(prefix)
            d, lengths, _, docs = read_index(p_idx)
            if dtype is None:
                dtype = d
            elif d != dtype:
                raise IptError(f"merge: {prefix} holds {d} tokens, the others {dtype}")
            if len(docs) != len(lengths) + 1:
                raise IptError(f"merge: {prefix} has multi-sequence documents; not supported")
            expected = int(lengths.sum(dtype=np.int64)) * d.itemsize
            size = p_bin.stat().st_size
            if size != expected:
                raise IptError(f"merge: {p_bin} has {size} bytes, its index says {expected}")
            with open(p_bin, "rb") as src:
                _copy(src, dst, size)
            all_lengths.append(np.array(lengths))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(partial_path(bin_path), bin_path)
    lengths = np.concatenate(all_lengths)
    assert dtype is not None
    write_index(idx_path, lengths, dtype)
    fsync_dir(out.parent)
    return {"documents": len(lengths), "tokens": int(lengths.sum(dtype=np.int64)), "datasets": len(prefixes)}
