"""Word n-grams of evaluation texts, and the scan that finds them in training texts (``decontaminate``).

Normalization (each step a setting, :class:`NgramSettings`): Unicode NFKC (full-width letters, ligatures,
no-break spaces fold to their plain forms), lowercase, punctuation and symbols *deleted* (lm-eval's janitor
deletes ``string.punctuation``; here every Unicode P* and S* character), then whitespace split.

The index maps each n-gram of the evaluation texts to the segments it came from. Words become integer ids
through the index's vocabulary (the words of the evaluation texts: a training word outside it cannot be part
of a match, id 0), and an n-gram is a 64-bit polynomial hash of its ids, so the scan of a text is a few
vectorised passes (one per indexed length) and one sorted lookup. Every candidate is then checked word for
word against the segment it points to: a hash collision never becomes a hit.

A text's words keep the character span of the whitespace-separated token they came from
(:func:`words_with_spans`); the fast path (:func:`words`) normalizes the whole text at once and yields the
same words, which the slow path, taken only for texts with a hit, re-derives with their spans.
"""

from __future__ import annotations

import bisect
import io
import itertools
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import IptError

PRIME = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio); arithmetic wraps mod 2**64
TOKEN = re.compile(r"\S+")


@dataclass(frozen=True)
class NgramSettings:
    n: int = 13
    lowercase: bool = True
    nfkc: bool = True
    punctuation: Literal["unicode", "ascii", "keep"] = "unicode"
    min_words: int = 8  # an evaluation text shorter than n words is indexed whole when it has at least this many

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=4)
def _deletions(kind: str) -> dict[int, None]:
    if kind == "keep":
        return {}
    if kind == "ascii":
        import string

        return dict.fromkeys(map(ord, string.punctuation))
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] in "PS"}


def normalize(text: str, s: NgramSettings) -> str:
    """The text as the index sees it, before the whitespace split."""
    if s.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if s.lowercase:
        text = text.lower()
    return text.translate(_deletions(s.punctuation))


def words(text: str, s: NgramSettings) -> list[str]:
    return normalize(text, s).split()


def words_with_spans(text: str, s: NgramSettings) -> list[tuple[str, int, int]]:
    """(word, start, end) per word: the span is the whitespace-separated token of ``text`` it came from."""
    out = []
    for m in TOKEN.finditer(text):
        for w in normalize(m.group(), s).split():
            out.append((w, m.start(), m.end()))
    return out


@dataclass(frozen=True)
class Segment:
    """One evaluation text: a task's document (question, gold answer, or both) or a reference file's record."""

    task: str
    doc: str  # the document's id within its task (its index in lm-eval's eval docs, or the reference's id)
    part: str  # "question", "answer", "question+answer", "reference"


@dataclass(frozen=True)
class Hit:
    segment: Segment
    start: int  # first word of the match in the scanned text
    length: int  # words
    words: tuple[str, ...]


class NgramIndex:
    """The n-grams of a set of evaluation segments (see the module docstring)."""

    def __init__(
        self,
        settings: NgramSettings,
        vocab: dict[str, int],
        segments: list[Segment],
        segment_words: list[np.ndarray],
        tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
        too_short: int = 0,
    ) -> None:
        self.settings = settings
        self.vocab = vocab
        self.segments = segments
        self.segment_words = segment_words  # word ids per segment
        # length -> (sorted hashes, segment of each entry, word offset of each entry)
        self.tables = tables
        # per length, a bitmap of the hashes' low bits: most windows are ruled out by one gather, and only the
        # few left (about n-grams / 2**22 of them at random) are looked up in the sorted table
        self.filters = {m: _bitmap(t[0]) for m, t in tables.items()}
        self.too_short = too_short  # segments shorter than settings.min_words: not indexed

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, settings: NgramSettings, texts: Iterable[tuple[Segment, str]]) -> NgramIndex:
        """The index of ``texts``: all n-grams of a text of at least n words; a shorter one whole (if it has at
        least ``min_words``). The vocabulary is sorted, so the same texts give the same index, byte for byte."""
        if settings.n < 1 or settings.min_words < 1:
            raise IptError(f"decontaminate: n ({settings.n}) and min_words ({settings.min_words}) must be >= 1")
        kept: list[tuple[Segment, list[str]]] = []
        too_short = 0
        for seg, text in texts:
            ws = words(text, settings)
            if len(ws) >= min(settings.n, settings.min_words):
                kept.append((seg, ws))
            else:
                too_short += 1
        vocab = {w: i + 1 for i, w in enumerate(sorted({w for _, ws in kept for w in ws}))}
        segments = [seg for seg, _ in kept]
        seg_ids = [np.array([vocab[w] for w in ws], dtype=np.uint64) for _, ws in kept]
        by_len: dict[int, tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = {}
        for k, ids in enumerate(seg_ids):
            m = min(settings.n, len(ids))
            h = window_hashes(ids, m)
            acc = by_len.setdefault(m, ([], [], []))
            acc[0].append(h)
            acc[1].append(np.full(len(h), k, dtype=np.uint32))
            acc[2].append(np.arange(len(h), dtype=np.uint32))
        tables = {}
        for m, (hs, segs, offs) in sorted(by_len.items()):
            h, s, o = np.concatenate(hs), np.concatenate(segs), np.concatenate(offs)
            order = np.lexsort((o, s, h))  # by hash, then segment, then offset: deterministic
            tables[m] = (h[order], s[order], o[order])
        return cls(settings, vocab, segments, seg_ids, tables, too_short)

    # -- size ---------------------------------------------------------------------------------------
    def ngram_count(self) -> int:
        """Distinct indexed n-grams (whole short texts included)."""
        return int(sum(len(np.unique(h)) for h, _, _ in self.tables.values()))

    def nbytes(self) -> int:
        arrays = sum(a.nbytes for t in self.tables.values() for a in t) + sum(a.nbytes for a in self.segment_words)
        arrays += sum(b.nbytes for b in self.filters.values())
        return int(arrays + sum(len(w) + 60 for w in self.vocab) + 120 * len(self.segments))

    # -- scanning -----------------------------------------------------------------------------------
    def _matches(self, ids: np.ndarray) -> list[tuple[int, int, int]]:
        """(start, length, segment) of every indexed n-gram in a sequence of word ids (0: a word no eval text
        has; no window holding one can match, so 0s also separate texts scanned together)."""
        known = ids != 0
        if not known.any():
            return []
        out: list[tuple[int, int, int]] = []
        zeros = np.concatenate(([0], np.cumsum(~known)))
        for m, (table, seg_of, off_of) in self.tables.items():
            if len(ids) < m:
                continue
            starts = np.flatnonzero((zeros[m:] - zeros[:-m]) == 0)  # windows without an unknown word
            if not len(starts):
                continue
            h = window_hashes(ids, m)[starts]
            maybe = self.filters[m][h & FILTER_MASK]
            starts, h = starts[maybe], h[maybe]
            pos = np.searchsorted(table, h)  # the first entry >= each hash
            found = np.zeros(len(h), dtype=bool)
            inside = pos < len(table)
            found[inside] = table[pos[inside]] == h[inside]
            for k in np.flatnonzero(found).tolist():
                start, p, target = int(starts[k]), int(pos[k]), h[k]
                window = ids[start : start + m]
                while p < len(table) and table[p] == target:  # every entry of this hash
                    seg, off = int(seg_of[p]), int(off_of[p])
                    if np.array_equal(self.segment_words[seg][off : off + m], window):  # not a hash collision
                        out.append((start, m, seg))
                    p += 1
        return out

    def scan_batch(self, texts: Sequence[str]) -> list[list[Hit]]:
        """The hits of each text, found in one vectorised pass over all of them (their word ids back to back,
        a 0 between two texts): the per-text cost of the numpy calls is paid once per batch."""
        lists = [words(t, self.settings) for t in texts]
        for ws in lists:
            ws.append("")  # id 0: no window crosses into the next text
        total = sum(len(ws) for ws in lists)
        flat = itertools.chain.from_iterable(lists)
        ids = np.fromiter(map(self.vocab.get, flat, itertools.repeat(0)), dtype=np.uint64, count=total)
        firsts = list(itertools.accumulate((len(ws) for ws in lists[:-1]), initial=0))
        hits: list[list[Hit]] = [[] for _ in lists]
        for start, m, seg in self._matches(ids):
            k = bisect.bisect_right(firsts, start) - 1
            local = start - firsts[k]
            hits[k].append(Hit(self.segments[seg], local, m, tuple(lists[k][local : local + m])))
        for found in hits:
            found.sort(key=lambda x: (x.start, x.length, x.segment.task, x.segment.doc, x.segment.part))
        return hits

    def scan(self, text: str) -> list[Hit]:
        return self.scan_batch([text])[0]

    # -- files --------------------------------------------------------------------------------------
    def save(self, folder: Path) -> dict[str, Any]:
        """``index.npz`` (the tables and the segments' word ids) and ``vocab.txt``; returns the summary the
        index manifest records."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for m, (h, s, o) in self.tables.items():
            arrays[f"hash_{m}"], arrays[f"seg_{m}"], arrays[f"off_{m}"] = h, s, o
        lengths = np.array([len(a) for a in self.segment_words], dtype=np.int64)
        arrays["segment_lengths"] = lengths
        arrays["segment_words"] = (
            np.concatenate(self.segment_words) if self.segment_words else np.zeros(0, dtype=np.uint64)
        )
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(folder / "index.npz", buf.getvalue())
        words_sorted = sorted(self.vocab, key=self.vocab.__getitem__)
        atomic_write_bytes(folder / "vocab.txt", "".join(w + "\n" for w in words_sorted).encode())
        return {
            "settings": self.settings.describe(),
            "segments": len(self.segments),
            "segments_too_short": self.too_short,
            "ngrams": self.ngram_count(),
            "lengths": {str(m): len(t[0]) for m, t in self.tables.items()},
            "vocabulary": len(self.vocab),
            "bytes_in_memory": self.nbytes(),
        }

    @classmethod
    def load(cls, folder: Path, settings: NgramSettings, segments: list[Segment]) -> NgramIndex:
        vocab_words = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        vocab = {w: i + 1 for i, w in enumerate(vocab_words)}
        with np.load(folder / "index.npz") as z:
            lengths = z["segment_lengths"]
            flat = z["segment_words"]
            bounds = np.concatenate(([0], np.cumsum(lengths)))
            seg_words = [flat[bounds[k] : bounds[k + 1]] for k in range(len(lengths))]
            tables = {}
            for key in z.files:
                if key.startswith("hash_"):
                    m = int(key[5:])
                    tables[m] = (z[key], z[f"seg_{m}"], z[f"off_{m}"])
        if len(seg_words) != len(segments):
            raise IptError(f"{folder}: the index has {len(seg_words)} segments, its segment list {len(segments)}")
        return cls(settings, vocab, segments, seg_words, dict(sorted(tables.items())))


FILTER_MASK = np.uint64((1 << 22) - 1)


def _bitmap(hashes: np.ndarray) -> np.ndarray:
    bits = np.zeros(1 << 22, dtype=bool)  # 4 MiB per indexed length
    bits[hashes & FILTER_MASK] = True
    return bits


def window_hashes(ids: np.ndarray, m: int) -> np.ndarray:
    """The polynomial hash of every window of ``m`` ids (uint64, wrapping)."""
    count = len(ids) - m + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(m):
            h = h * PRIME + ids[j : j + count]
    return h


def spans_of(text: str, hits: Sequence[Hit], s: NgramSettings) -> list[tuple[int, int]]:
    """Character span in ``text`` of each hit (from its first word's token start to its last word's token end)."""
    spans = words_with_spans(text, s)
    return [(spans[h.start][1], spans[h.start + h.length - 1][2]) for h in hits]


def excise(text: str, spans: Sequence[tuple[int, int]], window: int = 200, min_piece: int = 200, max_hits: int = 10):
    """lm-eval's janitor rule: each match and ``window`` characters either side are cut out; the pieces left
    that are longer than ``min_piece`` characters are kept; more than ``max_hits`` matches drop the text (None).
    Returns the kept pieces (possibly none)."""
    if len(spans) > max_hits:
        return None
    pieces = []
    cut_from = 0
    for start, end in sorted(spans):
        lo, hi = max(0, start - window), min(len(text), end + window)
        if lo - cut_from > min_piece:
            pieces.append(text[cut_from:lo])
        cut_from = max(cut_from, hi)
    if len(text) - cut_from > min_piece:
        pieces.append(text[cut_from:])
    return pieces
