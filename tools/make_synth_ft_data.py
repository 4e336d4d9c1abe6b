"""Rule-made fine-tuning data for ``finetune-synthesizer``: context -> instruction-response pairs.

Contexts are documents of the bundled demo corpus (data/demo: Python standard-library docstrings as
RefinedWeb-style records) and windows of their paragraphs. The pairs are made by rules, not by a model:
questions about the first and last sentence, completing a sentence, a function the text names, whether
a word occurs (yes/no), a word count, and a multiple-choice question in the released synthesizer's
convention (``question\\nOptions:\\n- a\\n- b``). Answers are capped (``--max-answer-words``) so a small
model learns to close each answer with ``</END>`` instead of copying on and on.

Documents are split by id (the shard stage's ``<file>:<line>``) into train and held-out, deterministically
(sha256 of the id), so the parse rate can be measured on contexts the model never saw. Same inputs and
arguments, same bytes.

    python tools/make_synth_ft_data.py --input data/demo --out data/synth-ft
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'])")
WORD = re.compile(r"[A-Za-z][A-Za-z_]{2,}")
CALL = re.compile(r"\b([A-Za-z_][A-Za-z0-9_.]*)\(")
FIRST_Q = ["What is the first sentence of the text?", "How does the text begin?", "Quote the opening sentence."]
LAST_Q = ["What is the last sentence of the text?", "How does the text end?"]
FUNC_Q = ["Which function does the text mention?", "Name a function that appears in the text."]
COUNT_Q = ["How many words are in the first sentence?", "Count the words of the opening sentence."]
MC_Q = ["Which of these words appears in the text?", "Which word is used in the text?"]


def read_corpus(folder: Path, text_field: str) -> list[dict[str, str]]:
    """``{"id", "text"}`` per document, ids as the shard stage makes them (``<file>:<line>``, 1-based)."""
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz"))):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    rec = json.loads(line)
                    docs.append({"id": f"{path.relative_to(folder)}:{line_no}", "text": rec[text_field]})
    return docs


def is_heldout(doc_id: str, share: float) -> bool:
    """Deterministic by-id split: the same document is held out whatever else is in the corpus."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h / 2**64 < share


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of a docstring (blank-line separated), without doctest and indented code blocks."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip() and not ln.startswith((" ", "\t", ">>>", "..."))]
        if lines:
            out.append(" ".join(ln.strip() for ln in lines))
    return out


def sentences(text: str) -> list[str]:
    return [s.strip() for p in prose_paragraphs(text) for s in SENT_END.split(p) if len(s.split()) >= 3]


def cap(words: list[str], n: int) -> str:
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def make_pairs(ctx: str, rng: random.Random, vocab: list[str], max_words: int) -> list[dict[str, str]]:
    """2-4 rule-made pairs about ``ctx``, kinds drawn without replacement, in random order."""
    sents = sentences(ctx)
    words = set(WORD.findall(ctx))
    long_words = sorted(w for w in words if len(w) >= 6)
    absent = [w for w in vocab if w not in words]
    makers = []
    if sents:
        makers.append(lambda: (rng.choice(FIRST_Q), cap(sents[0].split(), max_words)))
        makers.append(lambda: (rng.choice(COUNT_Q), str(len(sents[0].split()))))
    if len(sents) >= 2:
        makers.append(lambda: (rng.choice(LAST_Q), cap(sents[-1].split(), max_words)))
    full = [s for s in sents if len(s.split()) >= 8]
    if full:

        def complete() -> tuple[str, str]:
            w = rng.choice(full).split()
            k = rng.randint(3, min(6, len(w) - 3))
            return f'Complete the sentence: "{" ".join(w[:k])} ..."', cap(w[k:], max_words)

        makers.append(complete)
    calls = list(dict.fromkeys(CALL.findall(ctx)))
    if calls:
        makers.append(lambda: (rng.choice(FUNC_Q), f"{calls[0]}()"))
    if long_words and absent:

        def mention() -> tuple[str, str]:
            yes = rng.random() < 0.5
            w = rng.choice(long_words if yes else absent)
            return f'Does the text mention "{w}"?', "Yes" if yes else "No"

        def choice() -> tuple[str, str]:
            right = rng.choice(long_words)
            options = [right, *rng.sample(absent, min(len(absent), rng.randint(2, 3)))]
            rng.shuffle(options)
            return rng.choice(MC_Q) + "\nOptions:\n" + "\n".join(f"- {o}" for o in options), right

        makers += [mention, choice]
    rng.shuffle(makers)
    pairs, seen = [], set()
    for make in makers[: rng.randint(2, 4)]:
        q, a = make()
        if q.casefold() not in seen:
            seen.add(q.casefold())
            pairs.append({"Q": q, "A": a})
    return pairs


def clip(text: str, max_chars: int) -> str:
    """The text cut at the last paragraph (else line) boundary within ``max_chars``."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind("\n\n"), head.rfind("\n"))
    return head[:cut].rstrip() if cut > max_chars // 3 else head.rstrip()


def views(text: str, rng: random.Random, n: int, max_chars: int) -> list[str]:
    """The document itself (clipped) and ``n - 1`` windows of consecutive paragraphs."""
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    out = [clip(text, max_chars)]
    for _ in range(n - 1):
        i = rng.randrange(len(paras))
        j = rng.randint(i + 1, min(len(paras), i + 4))
        out.append(clip("\n\n".join(paras[i:j]), max_chars))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="data/demo", help="folder of RefinedWeb-style JSON Lines (.jsonl, .jsonl.gz)")
    ap.add_argument("--text-field", default="content")
    ap.add_argument("--out", default="data/synth-ft")
    ap.add_argument("--views", type=int, default=7, help="contexts per training document (itself + windows)")
    ap.add_argument("--heldout-share", type=float, default=0.2)
    ap.add_argument("--max-chars", type=int, default=2000, help="contexts are clipped to this many characters")
    ap.add_argument("--max-answer-words", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    docs = read_corpus(Path(args.input), args.text_field)
    counts = Counter(w for d in docs for w in set(WORD.findall(d["text"])))
    vocab = sorted(w for w, c in counts.items() if len(w) >= 6 and c <= 3)  # distractors for yes/no and options
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in ("train", "heldout"):
        n = 0
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for doc in docs:
                if is_heldout(doc["id"], args.heldout_share) != (split == "heldout"):
                    continue
                rng = random.Random(f"{args.seed}:{doc['id']}")
                ctxs = views(doc["text"], rng, args.views if split == "train" else 1, args.max_chars)
                for k, ctx in enumerate(ctxs):
                    pairs = make_pairs(ctx, rng, vocab, args.max_answer_words)
                    if pairs:
                        rec = {"id": f"{doc['id']}#{k}", "context": ctx, "pairs": pairs}
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        n += 1
        stats[split] = n
    print(f"{len(docs)} documents -> {stats['train']} train and {stats['heldout']} held-out examples in {out}")


if __name__ == "__main__":
    main()
