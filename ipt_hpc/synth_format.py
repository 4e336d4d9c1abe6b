"""The released instruction synthesizer's text protocol, and M-round chaining with exact token budgets.

Protocol (instruction-pretrain/instruction-synthesizer, a Mistral-7B fine-tune):

* prompt of one document: ``BOS`` + `` <CON> {text} </CON>`` + ``"\\n\\n"`` (note the leading space);
* the model answers pairs ``<QUE> {question} <ANS> {answer} </END>`` joined by ``"\\n\\n"``;
* in round r of multi-round (M-shot) inference, a document's prompt is prefixed by the chain of the
  earlier (text, pairs) entries of its slot, each closed by ``EOS``.

Token ids are computed once per document and never re-tokenized: a chained prompt is the
concatenation of its entries' ids. Segment boundaries: each document's context segment
`` <CON> {text} </CON>\\n\\n`` is tokenized on its own (``add_special_tokens=False``); BOS and EOS are
inserted as ids; an earlier entry's answer is the exact ids the engine generated. So the ids of a
chained prompt can differ, at segment edges, from tokenizing the prompt's whole text at once (that
is what the reference implementation does); see docs/synthesis.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CON_OPEN, CON_CLOSE = "<CON>", "</CON>"
QUE, ANS, END = "<QUE>", "<ANS>", "</END>"


def context_text(text: str) -> str:
    """The context segment of a document (without BOS)."""
    return f" {CON_OPEN} {text} {CON_CLOSE}\n\n"


def parse_pairs(generated: str) -> tuple[list[dict[str, str]], Counter[str]]:
    """Instruction-response pairs of one generation, and counts of what was dropped and why.

    Split on ``</END>``; the text after the last ``</END>`` is an incomplete pair (dropped); a pair
    needs exactly one ``<ANS>``, a non-empty question and a non-empty answer; questions are stripped
    and de-duplicated case-insensitively (the first one wins).
    """
    dropped: Counter[str] = Counter()
    parts = generated.split(END)
    if parts[-1].strip():
        dropped["incomplete"] += 1
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for part in parts[:-1]:
        if part.count(ANS) != 1:
            dropped["no_answer_tag" if ANS not in part else "several_answer_tags"] += 1
            continue
        q, a = part.split(ANS)
        q = q.strip()
        if q.startswith(QUE):
            q = q[len(QUE) :].strip()
        a = a.strip()
        if not q or QUE in q:
            dropped["bad_question"] += 1
            continue
        if not a:
            dropped["empty_answer"] += 1
            continue
        key = q.casefold()
        if key in seen:
            dropped["duplicate_question"] += 1
            continue
        seen.add(key)
        pairs.append({"Q": q, "A": a})
    return pairs, dropped


@dataclass
class Entry:
    """One document of a slot's chain: its context ids and, once generated, the answer ids."""

    doc: int  # index of the document in the shard
    context_ids: list[int]
    answer_ids: list[int] | None = None
    pairs: int = 0


@dataclass
class Slot:
    """The chain of entries one slot has accumulated over the rounds."""

    chain: list[Entry] = field(default_factory=list)
    chain_tokens: int = 0  # ids of the chain as a prefix: sum over entries of 1 + ctx + answer + 1

    def prefix_ids(self, bos: int, eos: int) -> list[int]:
        ids: list[int] = []
        for e in self.chain:
            ids.append(bos)
            ids.extend(e.context_ids)
            ids.extend(e.answer_ids or [])
            ids.append(eos)
        return ids


def entry_tokens(e: Entry) -> int:
    """Length of an entry inside a chain prefix: BOS + context + answer + EOS."""
    return 2 + len(e.context_ids) + len(e.answer_ids or [])


def rounds_of(num_docs: int, num_rounds: int) -> list[range]:
    """Split a shard's documents into ``num_rounds`` contiguous rounds; slot i is the i-th of each."""
    size = -(-num_docs // max(1, num_rounds)) if num_docs else 0
    return [range(r * size, min((r + 1) * size, num_docs)) for r in range(num_rounds) if r * size < num_docs]


def build_prompt(
    slot: Slot, entry: Entry, *, bos: int, eos: int, max_model_len: int, max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """Prompt ids for ``entry`` and the chained document indices used.

    The chain is used when ``prefix + BOS + context + max_new_tokens <= max_model_len``; otherwise the
    document starts a new chain (the slot's chain is reset by the caller via :func:`advance`).
    """
    own = 1 + len(entry.context_ids)
    if slot.chain and slot.chain_tokens + own + max_new_tokens <= max_model_len:
        return [*slot.prefix_ids(bos, eos), bos, *entry.context_ids], [e.doc for e in slot.chain]
    return [bos, *entry.context_ids], []


def advance(slot: Slot, entry: Entry, chained: list[int]) -> None:
    """Record a generated entry in its slot: extend the chain it used, or start a new one.

    A slot whose newest entry produced no pairs starts a new chain at its next document.
    """
    if not chained:
        slot.chain, slot.chain_tokens = [], 0
    if entry.pairs:
        slot.chain.append(entry)
        slot.chain_tokens += entry_tokens(entry)
    else:
        slot.chain, slot.chain_tokens = [], 0


def stats_histogram(counts: list[int], top: int = 10) -> dict[str, Any]:
    """Pairs-per-document histogram ``{"0": n0, ..., "10+": n}``."""
    hist: Counter[str] = Counter(str(c) if c < top else f"{top}+" for c in counts)
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0].rstrip("+"))))
