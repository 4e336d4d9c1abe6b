"""The released instruction synthesizer's text protocol, and M-round chaining with exact token budgets.

Protocol (instruction-pretrain/instruction-synthesizer, a Mistral-7B fine-tune; the reference is
microsoft/LMOps ``instruction_pretrain/utils/read_compre.py``):

* prompt of one document: ``BOS`` + `` <CON> {text} </CON>`` + ``"\\n\\n"`` (note the leading space);
* the model answers pairs ``<QUE> {question} <ANS> {answer} </END>`` joined by ``"\\n\\n"``;
* in round r of multi-round (M-shot) inference, a document's prompt is prefixed by the chain of the
  earlier entries of its slot, each ``BOS`` + its context segment + its *parsed* pairs re-rendered in
  that format + ``EOS`` (so a generation cut short, or a dropped or repeated pair, never becomes a
  few-shot example).

Ids are token-exact: every piece between two special tokens (a context segment, or an earlier entry's
context and pairs) is tokenized as one string, the way tokenizing the whole prompt string splits it
(``synthesize.PieceTokenizer``), and budgets are counted on those ids.
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


def render_pairs(pairs: list[dict[str, str]]) -> str:
    """Parsed pairs in the synthesizer's own format, as an earlier entry of a chain shows them."""
    return "\n\n".join(f"{QUE} {p['Q']} {ANS} {p['A']} {END}" for p in pairs)


def example_text(context: str, pairs: list[dict[str, str]]) -> str:
    """An earlier entry of a chain between its BOS and EOS: context segment, then its parsed pairs."""
    return context_text(context) + render_pairs(pairs)


PAIR_RULES = ("reference", "strict")


def parse_pairs(generated: str, rules: str = "reference") -> tuple[list[dict[str, str]], Counter[str]]:
    """Instruction-response pairs of one generation, and counts of what was dropped and why.

    The reference's rules (``parse_comprehension``): split on ``</END>``; the text after the last one is
    an incomplete pair (dropped); a pair needs exactly one ``<ANS>``, a question that starts with
    ``<QUE>`` (every ``<QUE>`` is then removed) and a non-empty answer; questions and answers are
    stripped and questions de-duplicated by their lower-case form (the first one wins). ``strict``
    also drops a pair whose question is empty or held a second ``<QUE>`` (the reference keeps those).
    """
    if rules not in PAIR_RULES:
        raise ValueError(f"pair rules {rules!r}: expected one of {', '.join(PAIR_RULES)}")
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
        q, a = (s.strip() for s in part.split(ANS))
        if not q.startswith(QUE):
            dropped["no_question_tag"] += 1
            continue
        if not a:
            dropped["empty_answer"] += 1
            continue
        tags = q.count(QUE)
        q = q.replace(QUE, "").strip()
        if rules == "strict" and (not q or tags > 1):
            dropped["bad_question"] += 1
            continue
        key = q.lower()
        if key in seen:
            dropped["duplicate_question"] += 1
            continue
        seen.add(key)
        pairs.append({"Q": q, "A": a})
    return pairs, dropped


@dataclass
class Entry:
    """One document of a slot's chain: its context ids and, once generated and parsed, its ids as an
    earlier example (context segment and re-rendered pairs as one piece, :func:`example_text`)."""

    doc: int  # index of the document in the shard
    context_ids: list[int]
    example_ids: list[int] | None = None
    pairs: int = 0


@dataclass
class Slot:
    """The chain of entries one slot has accumulated over the rounds."""

    chain: list[Entry] = field(default_factory=list)
    chain_tokens: int = 0  # ids of the chain as a prefix: sum over entries of 1 + example + 1

    def prefix_ids(self, bos: int, eos: int) -> list[int]:
        ids: list[int] = []
        for e in self.chain:
            ids.append(bos)
            ids.extend(e.example_ids or [])
            ids.append(eos)
        return ids


def entry_tokens(e: Entry) -> int:
    """Length of an entry inside a chain prefix: BOS + example (context and pairs) + EOS."""
    return 2 + len(e.example_ids or [])


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
