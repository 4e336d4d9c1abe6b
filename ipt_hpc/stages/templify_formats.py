"""How (raw text, instruction-response pairs) becomes instruction-augmented pre-training text.

The behaviour of the paper's reference templating (microsoft/LMOps ``instruction_pretrain/utils/
read_compre_pt.py``: ``cook_pt_entries``, ``parse_QA_list``, ``get_patterns``, ``format_one_pt_rc``),
with our own pattern tables (:mod:`ipt_hpc.stages.templify_patterns`). Per text (one few-shot chain) a
:class:`Style` is drawn: one pattern of each pair family, an options look, the separator between the
chain's entries and a *layout*:

* classic: [reading intro] text [lead-in] then the pairs, each in its family's pattern;
* dialog: the text, then the pairs as turns of two speakers;
* numbered: the text, then the questions numbered, then the answers numbered;
* inline few-shot: all pairs but the last as solved examples, then the last as the test;
* next turn: the text, a dialog of the first pairs, and the last pair as its next turn;

and *inversion* (the pairs first, then the text as what they were written from). Layout weights follow
the reference: classic 95 / dialog 5 for a chain whose smallest entry has fewer than two pairs, else
classic 80 and 5 each for dialog, numbered, inline and next turn; inversion 5% of the classic and dialog
texts. Each pair is classified as the reference does: a reasoning pair (``\\nLet's think step by step.``
ending its question, ``\\nTherefore, the answer is `` once in its answer) and a multiple-choice pair
(``\\nOptions:\\n- `` once in its question, the answer one of the options or a none-of-these phrase);
one that claims a shape it does not have is *malformed*: dropped by default, as the reference does, or
kept as an open question with ``templify.malformed: keep``. Every draw comes from one generator per text
(:func:`rng_for`), so a rerun gives the same bytes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from typing import Any

from . import templify_blocks as tb
from . import templify_patterns as tp

COT_QUESTION_CUE = "\nLet's think step by step."
COT_ANSWER_CUE = "\nTherefore, the answer is "
OPTIONS_MARK = "\nOptions:\n- "
OPTION_SPLIT = "\n- "

FAMILIES = ("qa", "qa_options", "qa_cot", "qa_options_cot")
KIND = {"qa": "open", "qa_options": "multiple_choice", "qa_cot": "cot", "qa_options_cot": "multiple_choice_cot"}
LAYOUT_WEIGHTS_FEW = {"classic": 95, "dialog": 5}  # the chain's smallest entry has fewer than 2 pairs
LAYOUT_WEIGHTS_MANY = {"classic": 80, "dialog": 5, "numbered": 5, "inline": 5, "next_turn": 5}
INVERSION_SHARE = 0.05  # of classic and dialog texts (the layouts the reference inverts)
MAX_NUMBERED = 26  # labels per numbering style: an entry with more pairs is not numbered


def rng_for(record_id: str, seed: int) -> random.Random:
    """A generator seeded by the record id and the global seed (stable across runs and machines)."""
    digest = hashlib.blake2b(f"{seed}\0{record_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


@dataclass
class Pair:
    """A synthesized pair, classified: its family and the fields its patterns use."""

    family: str
    fields: dict[str, str]

    @property
    def kind(self) -> str:
        return KIND[self.family]


@dataclass
class Style:
    """Every draw of one text: the look of its pairs, options, layout and wrappers."""

    patterns: dict[str, int]  # family -> index into templify_patterns.PAIR_FAMILIES[family]
    chain_sep: str
    option_start: str
    option_items: list[str]
    option_ends: list[str]
    none_phrase: str
    layout: str = "classic"
    inverted: bool = False
    parts: dict[str, Any] = field(default_factory=dict)  # the layout's own draws

    @property
    def name(self) -> str:
        return self.layout + ("+inverted" if self.inverted else "")


def draw_style(rng: random.Random) -> Style:
    """The draws made before the pairs are read (their options are shuffled with the same generator)."""
    fam = tp.PAIR_FAMILIES
    return Style(
        patterns={f: rng.randrange(len(fam[f])) for f in FAMILIES},
        chain_sep=rng.choice(fam["qa"]).example_separator,
        option_start=rng.choice(tb.OPTION_STARTS),
        option_items=rng.choice(tb.OPTION_ITEM_STYLES),
        option_ends=rng.choice(tb.OPTION_ITEM_ENDS),
        none_phrase=rng.choice(tb.NONE_OF_THESE),
    )


# -- classifying a pair (the reference's parse_QA_list) ---------------------------------------------
class Malformed(ValueError):
    """A pair that claims a reasoning or multiple-choice shape it does not have; ``reason`` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_NONE_OF_THESE = set(tb.NONE_OF_THESE)


def classify(question: str, answer: str, style: Style, rng: random.Random) -> Pair:
    """The pair's family and fields, or :class:`Malformed`."""
    fields = {"question": question, "answer": answer}
    cot = COT_QUESTION_CUE in question or COT_ANSWER_CUE in answer
    if cot:
        if not question.endswith(COT_QUESTION_CUE):
            raise Malformed("cot_question_cue")
        question = question[: -len(COT_QUESTION_CUE)].strip()
        parts = answer.split(COT_ANSWER_CUE)
        if len(parts) != 2:
            raise Malformed("cot_answer_cue")
        rationale, final = parts[0].strip(), parts[1].strip()
        if rationale.endswith("."):
            rationale = rationale[:-1]
        if not question or not rationale or not final:
            raise Malformed("cot_empty_part")
        fields = {"question": question, "answer": final, "cot": rationale}
    if OPTIONS_MARK not in fields["question"]:
        return Pair("qa_cot" if cot else "qa", fields)
    if fields["question"].count(OPTIONS_MARK) != 1:
        raise Malformed("options_marker_repeated")
    stem, block = fields["question"].split(OPTIONS_MARK)
    if not stem:
        raise Malformed("options_without_question")
    options = block.split(OPTION_SPLIT)
    if len(options) > len(style.option_items):
        raise Malformed("too_many_options")
    rng.shuffle(options)  # the synthesizer puts the right option at a few positions too often
    labels = style.option_items[: len(options)]
    final = fields["answer"]
    if final not in options and final in _NONE_OF_THESE:
        option_answer = style.none_phrase
    else:
        match = [i for i, o in enumerate(options) if o.strip() == final.strip()]
        if not match:
            raise Malformed("answer_not_an_option")
        distinct = len(set(style.option_items)) == len(style.option_items)
        option_answer = labels[match[0]].strip() if distinct else final  # bullets: the answer's own text
    block_text = style.option_start + "".join(
        label + option + end for label, option, end in zip(labels, options, style.option_ends, strict=False)
    )
    fields = {**fields, "question": stem, "options_": block_text, "option_answer": option_answer}
    return Pair("qa_options_cot" if cot else "qa_options", fields)


def classify_all(
    pairs: list[dict[str, str]], style: Style, rng: random.Random, keep_malformed: bool, malformed: dict[str, int]
) -> list[Pair]:
    """An entry's pairs, classified; malformed ones counted by reason, then dropped or kept as open."""
    out = []
    for p in pairs:
        try:
            out.append(classify(p["Q"], p["A"], style, rng))
        except Malformed as exc:
            malformed[exc.reason] = malformed.get(exc.reason, 0) + 1
            if keep_malformed:
                out.append(Pair("qa", {"question": p["Q"], "answer": p["A"]}))
    return out


# -- layouts (the reference's get_patterns and format_one_pt_rc) ------------------------------------
def draw_layout(style: Style, entries: list[list[Pair]], rng: random.Random) -> None:
    """Layout, inversion and the layout's own draws, from the chain's classified entries."""
    fewest = min(len(e) for e in entries)
    weights = LAYOUT_WEIGHTS_MANY if fewest >= 2 else LAYOUT_WEIGHTS_FEW
    layout = rng.choices(list(weights), weights=list(weights.values()))[0]
    if layout == "numbered" and max(len(e) for e in entries) > MAX_NUMBERED:
        layout = "classic"
    inverted = rng.random() < INVERSION_SHARE and layout in ("classic", "dialog")
    parts: dict[str, Any] = {}
    if inverted:
        parts |= {"qa_intro": rng.choice(tb.QA_INTROS), "qa_end": rng.choice(tb.QA_ENDS)}
        parts["text_intro"] = rng.choice(tb.TEXT_INTROS)
    if layout == "classic" and not inverted:
        parts |= {"read_intro": rng.choice(tb.READ_INTROS), "read_end": rng.choice(tb.READ_ENDS)}
        parts["lead"] = rng.choice(tb.COMPRE_LEADS)
    if layout in ("dialog", "next_turn"):
        asker, answerer = rng.choice(tb.SPEAKERS)
        parts |= {"dialog_start": rng.choice(tb.DIALOG_SEPS) + rng.choice(tb.DIALOG_HEADERS)}
        parts |= {"speakers": (asker, answerer), "turn_end": rng.choice(tb.DIALOG_ENDS)}
        parts["turn_sep"] = rng.choice(tb.DIALOG_EXAMPLE_SEPS)
    if layout == "next_turn":
        parts["next_turn"] = rng.choice(tb.NEXT_TURN)
    if layout == "numbered":
        parts |= {"numbering": rng.choice(tb.NUMBERED_STYLES), "numbered": rng.choice(tb.NUMBERED_PATTERNS)}
    if layout == "inline":
        parts |= {"explain": rng.choice(tb.INLINE_EXPLAIN), "plain": rng.choice(tb.INLINE_PLAIN)}
    style.layout, style.inverted, style.parts = layout, inverted, parts


def pattern(style: Style, family: str) -> tp.PairPattern:
    pat = tp.PAIR_FAMILIES[family][style.patterns[family]]
    if style.layout in ("dialog", "next_turn"):  # the same wording, as two speakers' turns
        asker, answerer = style.parts["speakers"]
        turn_end, turn_sep = style.parts["turn_end"], style.parts["turn_sep"]
        pat = replace(
            pat, inputs_prefix=asker, targets_prefix=answerer, x_y_delimiter=turn_end, example_separator=turn_sep
        )
    return pat


def render_entry(text: str, pairs: list[Pair], style: Style) -> str:
    """One entry (its text and at least one classified pair) in the text's layout."""
    parts = style.parts
    pats = [pattern(style, p.family) for p in pairs]
    sep = pats[-1].example_separator  # as the reference: the last pair's pattern separates them all
    shown = [pat.render(p.fields) for pat, p in zip(pats, pairs, strict=True)]
    if style.inverted:
        demos = parts["qa_intro"].format(qa_demos=sep.join(shown))
        return demos + parts["qa_end"] + parts["text_intro"].format(context=text)
    if style.layout == "classic":
        lead = parts["lead"]
        return (
            parts["read_intro"].format(context=text)
            + (parts["read_end"] if lead else "")
            + lead
            + sep
            + sep.join(shown)
        )
    if style.layout == "dialog":
        return text + parts["dialog_start"] + sep + sep.join(shown)
    if style.layout == "next_turn":
        dialog = "".join(pats[k].example_separator + shown[k] for k in range(len(pairs) - 1))
        return parts["next_turn"].format(context=text, dialog_=dialog, answer=shown[-1])
    if style.layout == "numbered":
        labels = parts["numbering"]
        questions = "".join(labels[k] + pats[k].input_text(p.fields) for k, p in enumerate(pairs))
        answers = "".join(labels[k] + pats[k].target_text(p.fields) for k, p in enumerate(pairs))
        return parts["numbered"].format(context=text, numbered_questions=questions, numbered_answers=answers)
    return _inline(text, pairs, style)


def _inline(text: str, pairs: list[Pair], style: Style) -> str:
    """Inline few-shot: the pairs in their families' plain (no reasoning) patterns, all but the last as
    solved examples (with their reasoning as the explanation when every pair has one), the last as the
    test; the explaining variant's patterns when every pair reasons, as the reference."""
    explain = all("cot" in p.fields for p in pairs)
    inline = style.parts["explain" if explain else "plain"]
    out = inline["context"].format(context=text)
    for k, p in enumerate(pairs):
        pat = tp.PAIR_FAMILIES[p.family.replace("_cot", "")][style.patterns[p.family.replace("_cot", "")]]
        given, wanted = pat.input_text(p.fields), pat.target_text(p.fields)
        if k < len(pairs) - 1:
            solved = {"output": wanted, "explanation": p.fields.get("cot", "")}
            out += inline["ex_input"].format(input=given) + inline["ex_output"].format(**solved)
            out += inline["example_separator"]
        else:
            out += inline["test_input"].format(input=given) + inline["test_output"].format(output=wanted)
    return out
