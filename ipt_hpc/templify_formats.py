"""Formats that turn (raw text, instruction-response pairs) into instruction-augmented pre-training text.

The paper renders synthesized pairs with varied FLAN-style templates so the model does not overfit one
surface form. Our families, written for this project:

* **intro**: how the text is introduced (none, "Read this article ...", a label, a trailing prompt);
* **qa**: question/answer prefixes ("Q:"/"A:", "Question:"/"Answer:", "Input:"/"Output:", bare, ...)
  and how a question is joined to its answer;
* **options**: for multiple-choice questions (an ``Options:`` block in the synthesized question), the
  option labels (letters, numbers, roman numerals, bullets), shuffled, and how the answer names the
  right option; an unanswerable answer becomes a "none of the above"-style option;
* **cot**: for answers with a rationale ("... so the answer is X"), rationale-first, answer-first or
  labelled reasoning.

One :class:`Format` is drawn per text from a seed derived from the text's id and a global seed
(:func:`rng_for`), so a rerun gives the same bytes and different records get different formats. All
entries of a few-shot chain share their text's format, as few-shot examples do.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

# (before the text, after the text)
INTROS: dict[str, tuple[str, str]] = {
    "none": ("", ""),
    "read_answer": ("Read this article and answer the questions below.\n\n", ""),
    "passage_label": ("Passage: ", ""),
    "article_label": ("Article:\n", "\n\nNow answer these questions:"),
    "context_label": ("Context: ", ""),
    "based_on_above": ("", "\n\nAnswer the following questions using the text above."),
    "consider": ("Consider the text below.\n\n", ""),
    "document_label": ("Document:\n", ""),
    "questions_follow": ("", "\n\nQuestions about this text follow."),
    "test_reading": ("Test your reading comprehension with the following passage.\n\n", ""),
}

# (question prefix, answer prefix, joiner between question and answer); "{n}" is the pair's number
QA_STYLES: dict[str, tuple[str, str, str]] = {
    "q_a": ("Q: ", "A: ", "\n"),
    "question_answer": ("Question: ", "Answer: ", "\n"),
    "input_output": ("Input: ", "Output: ", "\n"),
    "instruction_response": ("Instruction: ", "Response: ", "\n"),
    "user_assistant": ("User: ", "Assistant: ", "\n"),
    "query_reply": ("Query: ", "Reply: ", "\n"),
    "problem_solution": ("Problem: ", "Solution: ", "\n"),
    "bare": ("", "", "\n"),
    "numbered": ("Q{n}. ", "A{n}. ", "\n"),
    "bracketed": ("[Question] ", "[Answer] ", " "),
    "inline_q_a": ("Q: ", "A: ", " "),
}

PAIR_SEPARATORS: dict[str, str] = {"blank_line": "\n\n", "newline": "\n"}

# option label styles: a function of the option's position
ROMAN = ["i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix", "x", "xi", "xii"]
OPTION_LABELS: dict[str, tuple[str, str]] = {  # (label kind, line pattern with {l} for the label)
    "letter_dot": ("upper", "{l}. "),
    "letter_paren": ("upper", "({l}) "),
    "letter_close": ("upper", "{l}) "),
    "lower_close": ("lower", "{l}) "),
    "number_dot": ("number", "{l}. "),
    "number_paren": ("number", "({l}) "),
    "roman_dot": ("roman", "{l}. "),
    "bullet": ("none", "- "),
}
OPTION_HEADERS = ["Options:\n", "Choices:\n", "Pick one:\n", "Select from the following.\n", ""]
# how the answer to a multiple-choice question is written: label only, label + text, text only
MC_ANSWERS = ["label", "label_text", "text"]
NONE_OPTIONS = ["None of the above", "Not enough information", "It cannot be determined from the text"]

COT_STYLES: dict[str, str] = {
    "rationale_first": "{rationale} So the answer is {final}.",
    "step_by_step": "Let's think step by step. {rationale} Therefore, the answer is {final}.",
    "answer_first": "{final}\nExplanation: {rationale}",
    "labelled": "Reasoning: {rationale}\nFinal answer: {final}",
}

_OPTIONS_HEAD = re.compile(
    r"(?im)^[ \t]*(?:options|choices|choose from|select from|pick from|answer choices)[ \t]*:[ \t]*"
)
_OPTION_LINE = re.compile(r"^\s*(?:[-*•]|\(?[A-Za-z0-9]{1,4}[.)])\s+(.+?)\s*$")
_FINAL = re.compile(
    r"^(?P<rationale>.+?)[\s.,;]+(?:so|therefore|thus|hence),?\s+the (?:final )?answer is:?\s*(?P<final>.+?)\.?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_STEP_BY_STEP = re.compile(r"^\s*let'?s think step by step[.:]?\s*", re.IGNORECASE)
# the released synthesizer marks a reasoning question with this line at its end (its answer then ends
# "\nTherefore, the answer is X")
_COT_TRIGGER = re.compile(r"\s*let'?s think step by step[.:]?\s*$", re.IGNORECASE)
_UNANSWERABLE = re.compile(
    r"^(?:none of the above|unanswerable|not answerable|no answer|not enough information|insufficient information"
    r"|(?:it )?cannot be (?:determined|answered)(?: from the (?:text|passage|context))?"
    r"|(?:it is )?not possible to (?:tell|say|determine)|the (?:text|passage|context) does not say)\.?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Format:
    """One draw of every family: the look of one pre-training text."""

    intro: str
    qa: str
    pair_sep: str
    option_labels: str
    option_header: int
    mc_answer: str
    cot: str

    @property
    def name(self) -> str:
        """The format's identity for stats (the option and cot parts count only where used)."""
        return f"{self.intro}/{self.qa}/{self.pair_sep}"


def rng_for(record_id: str, seed: int) -> random.Random:
    """A generator seeded by the record id and the global seed (stable across runs and machines)."""
    digest = hashlib.blake2b(f"{seed}\0{record_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def draw_format(rng: random.Random) -> Format:
    return Format(
        intro=rng.choice(sorted(INTROS)),
        qa=rng.choice(sorted(QA_STYLES)),
        pair_sep=rng.choice(sorted(PAIR_SEPARATORS)),
        option_labels=rng.choice(sorted(OPTION_LABELS)),
        option_header=rng.randrange(len(OPTION_HEADERS)),
        mc_answer=rng.choice(MC_ANSWERS),
        cot=rng.choice(sorted(COT_STYLES)),
    )


# -- parsing a synthesized pair -----------------------------------------------------------------
def split_options(question: str) -> tuple[str, list[str]]:
    """``(stem, options)`` of a question with an ``Options:`` block; ``(question, [])`` otherwise.

    Options are lines starting with a bullet or a label (``- x``, ``A. x``, ``(2) x``) after the
    header, or `` - x - y`` on the header's own line.
    """
    m = _OPTIONS_HEAD.search(question)
    if not m:
        return question, []
    stem, rest = question[: m.start()].rstrip(), question[m.end() :]
    options: list[str] = []
    lines = rest.splitlines()
    if lines and lines[0].strip().startswith("- ") and lines[0].count(" - ") >= 1:
        options = [o.strip() for o in ("\n" + lines[0].strip()).split("\n- ")[1].split(" - ")]
        lines = lines[1:]
    for line in lines:
        if not line.strip():
            continue
        om = _OPTION_LINE.match(line)
        if om is None:
            return question, []  # not an options block we understand: keep the question as written
        options.append(om.group(1))
    options = [o for o in options if o]
    if len(options) < 2 or not stem:
        return question, []
    return stem, options


def split_rationale(answer: str) -> tuple[str, str] | None:
    """``(rationale, final)`` of an answer that reasons before concluding, else None."""
    m = _FINAL.match(answer.strip())
    if m is None:
        return None
    rationale = _STEP_BY_STEP.sub("", m.group("rationale")).strip()
    final = m.group("final").strip()
    if not rationale or not final:
        return None
    if rationale[-1] not in ".!?":
        rationale += "."
    return rationale, final


def is_unanswerable(answer: str) -> bool:
    return bool(_UNANSWERABLE.match(answer.strip()))


def _norm(s: str) -> str:
    return " ".join(s.casefold().split()).rstrip(".")


# -- rendering ----------------------------------------------------------------------------------
def option_label(style: str, i: int) -> str:
    kind, pattern = OPTION_LABELS[style]
    label = {
        "upper": chr(ord("A") + i) if i < 26 else str(i + 1),
        "lower": chr(ord("a") + i) if i < 26 else str(i + 1),
        "number": str(i + 1),
        "roman": ROMAN[i] if i < len(ROMAN) else str(i + 1),
        "none": "",
    }[kind]
    return pattern.format(l=label)


@dataclass
class RenderedPair:
    """A pair as it appears in the text; for multiple choice, which option is right (for checks)."""

    question: str
    answer: str
    kind: str  # "open", "multiple_choice", "cot", "multiple_choice_cot"
    options: list[tuple[str, str]] | None = None  # (label prefix, option text), in shown order
    correct: int | None = None  # index into options


def render_pair(q: str, a: str, fmt: Format, rng: random.Random) -> RenderedPair:
    """Render one pair: options shuffled and relabelled, rationale restyled, answer mapped."""
    cot = split_rationale(a)
    if cot:  # our CoT styles word the reasoning cue themselves
        q = _COT_TRIGGER.sub("", q)
    stem, options = split_options(q)
    final = cot[1] if cot else a
    kind = "open"
    shown: list[tuple[str, str]] | None = None
    correct = None
    question = q
    if options:
        order = options[:]
        rng.shuffle(order)
        match = [i for i, o in enumerate(order) if _norm(o) == _norm(final)]
        if not match and is_unanswerable(final):
            nota = [i for i, o in enumerate(order) if is_unanswerable(o)]
            if nota:
                match = nota[:1]
            else:
                order.append(rng.choice(NONE_OPTIONS))  # the synthesizer said no option fits
                match = [len(order) - 1]
        if match:
            kind = "multiple_choice"
            correct = match[0]
            shown = [(option_label(fmt.option_labels, i), o) for i, o in enumerate(order)]
            header = OPTION_HEADERS[fmt.option_header]
            question = stem + "\n" + header + "\n".join(p + o for p, o in shown)
            label = shown[correct][0].strip().strip("().")
            if fmt.option_labels == "bullet" or fmt.mc_answer == "text":
                final = order[correct]
            elif fmt.mc_answer == "label":
                final = label
            else:
                final = f"{shown[correct][0].strip()} {order[correct]}"
    if cot:
        kind = "multiple_choice_cot" if kind == "multiple_choice" else "cot"
        answer = COT_STYLES[fmt.cot].format(rationale=cot[0], final=final)
    else:
        answer = final
    return RenderedPair(question, answer, kind, shown, correct)


def render_entry(text: str, pairs: list[dict[str, str]], fmt: Format, rng: random.Random) -> tuple[str, list[str]]:
    """One (text, pairs) entry as text, and the kinds of its rendered pairs; no pairs: the raw text."""
    if not pairs:
        return text, []
    before, after = INTROS[fmt.intro]
    qp, ap, join = QA_STYLES[fmt.qa]
    blocks, kinds = [], []
    for n, pair in enumerate(pairs, 1):
        r = render_pair(pair["Q"], pair["A"], fmt, rng)
        blocks.append(f"{qp.format(n=n)}{r.question}{join}{ap.format(n=n)}{r.answer}")
        kinds.append(r.kind)
    return f"{before}{text}{after}\n\n" + PAIR_SEPARATORS[fmt.pair_sep].join(blocks), kinds


ENTRY_SEPARATOR = "\n\n"  # between the few-shot examples of a chain
