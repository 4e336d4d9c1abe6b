"""Side by side with the paper's reference procedure (microsoft/LMOps ``instruction_pretrain``): the
prompts ipt_hpc sends for every round, and the ids of every context, for any text.

The reference is written here from its documented behaviour (docs/recipe.md, "Synthesis protocol"), not
from its code: a prompt is a string (``<s> <CON> {text} </CON>\\n\\n``, after the chain of the slot's
earlier entries, each ``<s> <CON> {text} </CON>\\n\\n`` + its parsed pairs as ``<QUE> q <ANS> a </END>``
joined by blank lines + ``</s>``), which the engine tokenizes whole. ipt_hpc builds ids piece by piece;
they must equal the whole string's ids, with a SentencePiece tokenizer (Mistral-7B-v0.1's, from PyPI's
mistral-common wheel: ``tools/fetch-test-assets``) and with byte-level BPEs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from ipt_hpc.config import load_config
from ipt_hpc.stages import synthesize
from ipt_hpc.stages.synth_engines import Generation

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
MISTRAL_SP = REPO / ".cache" / "test-assets" / "mistral-7b-v0.1-sp"

TEXTS = [
    "Plain prose about cats and the mats they sit on.",
    "A text that ends with a space ",
    "  Two leading spaces, then words.",
    "Line one.\nLine two.\n\nA paragraph after a blank line.\n",
    "\tA tab, unicode: naïve café — 東京, and trailing blanks \n ",
    "Ends with two spaces  ",
    "Numbers 3.14 and 2,718; punctuation!? (brackets) [more] {braces}",
    "ends without a period",
    "\n\nLeading newlines and an ending newline\n",
    "Short.",
    "Another ordinary document about the weather in spring.",
    "Last one: it talks about tokenizers and whitespace. ",
]

# Generations, one per document: complete pairs, a pair cut at max_new_tokens, a duplicate question, a
# piece without <QUE>, nothing parseable, a trailing blank after </END>.
GENERATIONS = [
    "<QUE> What sits on the mat? <ANS> A cat. </END>\n\n<QUE> Where? <ANS> On the mat. </END>",
    "<QUE> How does it end? <ANS> With a space. </END>\n\n<QUE> Is this pair compl",
    "<QUE> How many spaces lead? <ANS> Two. </END>\n\n<QUE> how many spaces lead? <ANS> 2 </END>",
    "Garbage before <ANS> no question tag </END>\n\n<QUE> How many lines? <ANS> Three.\nOne blank. </END>",
    "nothing that parses at all",
    "<QUE> What ends it? <ANS> Two spaces. </END> \n",
    "<QUE> Which number is pi? <ANS> 3.14 </END>",
    "<QUE> Does it end with a period? <ANS> No. </END>\n\n<QUE> Why? <ANS> It was cut. </END>",
    "<QUE> What leads? <ANS> Newlines. </END>",
    "<QUE> Is it short?\nOptions:\n- yes\n- no <ANS> yes </END>",
    "<QUE> Which season? <ANS> Spring. </END>",
    "<QUE> What is it about? <ANS> Tokenizers. </END>",
]


def reference_pairs(generation: str) -> list[dict[str, str]]:
    """The reference's parse: pieces split on </END> (the last one dropped unless the text ends with
    </END>), exactly one <ANS>, a question starting with <QUE> (all <QUE> removed), a non-empty answer,
    questions unique by their lower-case form."""
    pieces = generation.split("</END>")
    if not generation.endswith("</END>"):
        pieces = pieces[:-1]
    pairs, seen = [], set()
    for piece in pieces:
        parts = piece.split("<ANS>")
        if len(parts) != 2:
            continue
        q, a = parts[0].strip(), parts[1].strip()
        if not q.startswith("<QUE>") or not a:
            continue
        q = q.replace("<QUE>", "").strip()
        if q.lower() not in seen:
            seen.add(q.lower())
            pairs.append({"Q": q, "A": a})
    return pairs


def reference_prompts(texts: list[str], generations: list[str], rounds: int) -> list[str]:
    """The reference's prompt strings: documents split into ``rounds`` contiguous rounds of ceil(N/M);
    slot i of a round continues the chain segment of slot i, whose entries are re-rendered from their
    parsed pairs; an entry without pairs ends its segment (budgets are generous here: all chains fit)."""
    size = math.ceil(len(texts) / rounds)
    segments: dict[int, list[tuple[str, list[dict[str, str]]]]] = {}
    prompts = [""] * len(texts)
    for r in range(rounds):
        for i, d in enumerate(range(r * size, min((r + 1) * size, len(texts)))):
            own = f"<s> <CON> {texts[d]} </CON>\n\n"
            segment = segments.get(i, [])
            history = "".join(
                f"<s> <CON> {t} </CON>\n\n"
                + "\n\n".join(f"<QUE> {p['Q']} <ANS> {p['A']} </END>" for p in pairs)
                + "</s>"
                for t, pairs in segment
            )
            prompts[d] = history + own
            pairs = reference_pairs(generations[d])
            segments[i] = [*segment, (texts[d], pairs)] if pairs else []
    return prompts


class ScriptedEngine:
    """The synthesizer replaced by fixed generations (this test is about what is sent, given them):
    results come back in reverse order of submission, as a real engine's may."""

    def __init__(self, tokenizer: Any, generations: list[str]) -> None:
        self.tokenizer = tokenizer
        self.generations = generations
        self.sent: dict[int, list[int]] = {}
        self.queue: list[int] = []

    def capacity(self) -> int:
        return 5

    def submit(self, key: int, prompt: list[int], max_new_tokens: int) -> None:
        self.sent[key] = prompt
        self.queue.append(key)

    def collect(self) -> list[tuple[int, Generation]]:
        out = []
        for key in reversed(self.queue):
            text = self.generations[key]
            out.append((key, Generation(self.tokenizer(text, add_special_tokens=False)["input_ids"], text)))
        self.queue = []
        return out

    def cancel(self) -> None:
        self.queue = []


def job_for(**sets: Any) -> synthesize.SynthJob:
    base = {"synth.model": "scripted", "synth.max_model_len": 4096, "synth.max_new_tokens": 400, "synth.rounds": 3}
    cfg = load_config(None, None, {**base, **{f"synth.{k}": v for k, v in sets.items()}})
    return synthesize.synth_job(cfg, None)


def mistral_sp() -> Any:
    if not (MISTRAL_SP / "tokenizer.model").exists():
        if os.environ.get("IPT_REQUIRE_ASSETS") == "1":
            pytest.fail(f"{MISTRAL_SP}/tokenizer.model is missing: run tools/fetch-test-assets (make test does)")
        pytest.skip("Mistral's SentencePiece model not fetched (tools/fetch-test-assets)")
    pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MISTRAL_SP))


@pytest.fixture(scope="module", params=["mistral-sp", "tiny-synthesizer", "bpe-no-tags"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    if request.param == "mistral-sp":
        return mistral_sp()
    if request.param == "tiny-synthesizer":  # byte-level BPE, the five tags as added tokens
        return AutoTokenizer.from_pretrained(str(REPO / "models" / "tiny-synthesizer"))
    from tokenizer_fixture import train_tokenizer  # byte-level BPE, tags as plain text

    return AutoTokenizer.from_pretrained(str(train_tokenizer(tmp_path_factory.mktemp("bpe"))))


def whole(tok: Any, prompt: str) -> list[int]:
    return tok(prompt, add_special_tokens=False)["input_ids"]


def test_context_ids_equal_the_whole_prompt_string_for_every_text(tok: Any) -> None:
    pieces = synthesize.PieceTokenizer(tok)
    ids, used, cut = synthesize.context_ids(pieces, TEXTS, room=2000)
    assert cut == 0 and used == TEXTS
    for text, got in zip(TEXTS, ids, strict=True):
        assert [tok.bos_token_id, *got] == whole(tok, f"<s> <CON> {text} </CON>\n\n"), repr(text)


def test_separately_tokenized_segments_would_differ_with_sentencepiece() -> None:
    """Why the context is one piece: Mistral's tokenizer reads ``end `` + `` </CON>`` differently apart
    (the check above would catch a return to segment-wise ids)."""
    tok = mistral_sp()
    text = "A text that ends with a space "
    apart = [tok(s, add_special_tokens=False)["input_ids"] for s in (" <CON>", " " + text, " </CON>\n\n")]
    assert [tok.bos_token_id, *apart[0], *apart[1], *apart[2]] != whole(tok, f"<s> <CON> {text} </CON>\n\n")


def test_a_cut_context_stays_exact_and_fits(tok: Any) -> None:
    pieces = synthesize.PieceTokenizer(tok)
    long = " ".join(TEXTS) * 3 + " tail "
    for room in (24, 57, 101):
        (got,), (part,), cut = synthesize.context_ids(pieces, [long], room=room)
        assert cut == 1 and len(got) <= room and long.startswith(part) and len(part) < len(long)
        assert [tok.bos_token_id, *got] == whole(tok, f"<s> <CON> {part} </CON>\n\n")
        longer = whole(tok, f"<s> <CON> {long[: len(part) + 8]} </CON>\n\n")
        assert len(longer) - 1 > room - 8, "the cut left more than a few tokens of room unused"
    with pytest.raises(Exception, match="leaves no room"):
        synthesize.context_ids(pieces, ["x"], room=3)


@pytest.mark.parametrize("rounds", [2, 3])
def test_round_prompts_equal_the_reference_procedure(tok: Any, rounds: int) -> None:
    job = job_for(rounds=rounds)
    engine = ScriptedEngine(tok, GENERATIONS)
    docs = [{"id": f"doc:{d}", "text": t} for d, t in enumerate(TEXTS)]
    ids = synthesize.ContextIds(tok, TEXTS, job, block=4)
    try:
        records = list(synthesize.Scheduler(job, engine, docs, ids).records(window=engine.capacity()))
    finally:
        ids.close()
    want = reference_prompts(TEXTS, GENERATIONS, rounds)
    chained = 0
    for d, prompt in enumerate(want):
        assert engine.sent[d] == whole(tok, prompt), f"document {d}: prompt differs from the reference's"
        if tok.name_or_path != str(MISTRAL_SP):  # byte-level BPE decodes losslessly: the strings are equal
            assert tok.decode(engine.sent[d]) == prompt
        assert records[d]["pairs"] == reference_pairs(GENERATIONS[d])
        chained += prompt.count("</s>")
    assert chained >= (4 if rounds == 2 else 7), "too few chained entries to compare"


def test_chains_drop_whole_when_over_the_budget(tok: Any) -> None:
    """As the reference: a chain that does not fit is left out whole (never trimmed from the oldest)."""
    ctx, _, _ = synthesize.context_ids(synthesize.PieceTokenizer(tok), TEXTS, room=2000)
    engine = ScriptedEngine(tok, GENERATIONS)
    # room for document 4's own prompt and answer, but not for document 0's entry in front of it
    own = 1 + len(ctx[4])
    job = job_for(rounds=3, max_model_len=own + 10 + 20, max_new_tokens=20)
    docs = [{"id": f"doc:{d}", "text": t} for d, t in enumerate(TEXTS)]
    ids = synthesize.ContextIds(tok, TEXTS, job, block=4)
    try:
        records = list(synthesize.Scheduler(job, engine, docs, ids).records(window=1))
    finally:
        ids.close()
    assert records[4]["chain"] == [] and engine.sent[4] == [tok.bos_token_id, *ctx[4]]
    for d, rec in enumerate(records):
        assert rec["prompt_tokens"] + 20 <= job.max_model_len, d
