"""Template tables for the templify stage, generated from small hand-written building blocks.

The wording here is our own: every table below is produced combinatorially (plain loops, no randomness
at import) from the short phrase lists at the top of this module, which is the script the project keeps
to generate them. The families mirror the *structure* of the reference implementation's tables (the
paper's ``read_compre_pt.py``), not its wording, and each reaches at least the reference's size:

* pair families: ``qa`` (reference 79), ``qa_options`` (48, half with the options hidden), ``qa_cot``
  (210) and ``qa_options_cot`` (240), each a list of :class:`PairPattern`;
* reading intros (100, half the bare ``{context}`` so that a uniform draw leaves half the texts bare),
  comprehension lead-ins (168, half empty), text intros for inverted texts (60), QA intros (42);
* option blocks (headers, item labels, item ends, "none of these" phrases), dialogs, numbered
  questions, inline few-shot patterns and next-turn patterns.

Duplicates are removed while keeping the first occurrence, except where a repeated entry is the point
(the bare intros and empty lead-ins). :func:`.templify_blocks.counts` gives the length of every table.
"""

from __future__ import annotations

import string
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T", bound=Hashable)
X = TypeVar("X")
Y = TypeVar("Y")


@dataclass(frozen=True)
class PairPattern:
    """How one pair is written: inputs_prefix + inputs + x_y_delimiter + targets_prefix + targets."""

    inputs: str  # a str.format template using some of: {question} {answer} {options_} {option_answer} {cot}
    targets: str  # idem
    inputs_prefix: str = ""  # literal text (no format fields), e.g. "Q: "
    targets_prefix: str = ""  # e.g. "A: "
    x_y_delimiter: str = "\n"  # between input and target
    example_separator: str = "\n\n"  # between consecutive pairs of one text

    def input_text(self, fields: Mapping[str, str]) -> str:
        return self.inputs.format(**fields)

    def target_text(self, fields: Mapping[str, str]) -> str:
        return self.targets.format(**fields)

    def render(self, fields: Mapping[str, str]) -> str:
        return (
            self.inputs_prefix
            + self.input_text(fields)
            + self.x_y_delimiter
            + self.targets_prefix
            + self.target_text(fields)
        )

    @property
    def fields(self) -> frozenset[str]:
        """The format fields the pattern uses."""
        return template_fields(self.inputs) | template_fields(self.targets)


def template_fields(template: str) -> frozenset[str]:
    """The names of the format fields in ``template``."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


FAMILY_FIELDS: dict[str, frozenset[str]] = {
    "qa": frozenset({"question", "answer"}),
    "qa_options": frozenset({"question", "options_", "option_answer", "answer"}),
    "qa_cot": frozenset({"question", "answer", "cot"}),
    "qa_options_cot": frozenset({"question", "options_", "option_answer", "answer", "cot"}),
}


# -- helpers -----------------------------------------------------------------------------------------
def _unique(items: Iterable[T]) -> list[T]:
    """The items without exact repeats, first occurrences kept in order."""
    return list(dict.fromkeys(items))


def _rotate(xs: Sequence[X], ys: Sequence[Y], per: int) -> Iterator[tuple[int, X, Y]]:
    """Each x with ``per`` consecutive ys, starting one further for each x (so every y is used evenly)."""
    n = 0
    for i, x in enumerate(xs):
        for j in range(per):
            yield n, x, ys[(i + j) % len(ys)]
            n += 1


def _spread(n: int, weighted: Sequence[tuple[str, float]]) -> list[str]:
    """``n`` choices in the given shares, interleaved (smooth weighted round robin)."""
    total = sum(w for _, w in weighted)
    credit = [0.0] * len(weighted)
    out = []
    for _ in range(n):
        for k, (_, w) in enumerate(weighted):
            credit[k] += w
        best = max(range(len(weighted)), key=credit.__getitem__)
        credit[best] -= total
        out.append(weighted[best][0])
    return out


def _roman(n: int) -> str:
    out = ""
    for value, numeral in ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out += numeral
            n -= value
    return out


_LABELS: dict[str, list[str]] = {
    "upper": [chr(ord("A") + i) for i in range(26)],
    "lower": [chr(ord("a") + i) for i in range(26)],
    "number": [str(i + 1) for i in range(26)],
    "roman": [_roman(i + 1) for i in range(26)],
    "roman_lower": [_roman(i + 1).lower() for i in range(26)],
}


def _labels(fmt: str, kind: str) -> list[str]:
    """26 labels: ``fmt`` with ``{l}`` replaced by each label of ``kind``."""
    return [fmt.replace("{l}", label) for label in _LABELS[kind]]


# -- building blocks: plain question answering -------------------------------------------------------
_QA_LABELS = [
    ("Q: ", "A: "), ("Question: ", "Answer: "), ("Input: ", "Output: "), ("Problem: ", "Solution: "),
    ("Instruction: ", "Response: "), ("User: ", "Assistant: "), ("Query: ", "Reply: "), ("Prompt: ", "Completion: "),
    ("Ask: ", "Answer: "), ("Task: ", "Result: "), ("Request: ", "Response: "), ("Quiz: ", "Solution: "),
    ("Q. ", "A. "), ("[Question] ", "[Answer] "), ("Question:\n", "Answer:\n"), ("Human: ", "AI: "),
]  # fmt: skip
_QA_ASKS = [
    "Answer this question: {question}",
    "Answer the following question.\n{question}",
    "Please answer the question below.\n\n{question}",
    "{question}\nWhat is the answer?",
    "{question} What's the answer?",
    "Respond to this question: {question}",
    "Give a short answer to the question: {question}",
    "Here is a question about the text: {question}",
    "Using the text above, answer: {question}",
    "Try this one: {question}",
    "{question}\nAnswer briefly.",
    "{question}\nKeep the answer short.",
    "A question from the article: {question}",
    "Think about the text, then answer.\n{question}",
    "Reply to the question below.\n{question}",
    "Can you answer this? {question}",
    "{question}\nWhat would you say?",
    "Answer based on the passage: {question}",
    "Quick question: {question}",
    "{question}\nRespond with the answer only.",
    "What is the answer to this question?\n{question}",
    "Here's something to answer: {question}",
    "{question}\nGive your answer below.",
    "Look back at the text and answer: {question}",
    "Solve this question.\n{question}",
]
_QA_REPLIES = ["", "Answer: ", "A: ", "The answer is: ", "", "Response: ", "Reply: "]
_QA_INVERTED = [
    "Write a question whose answer is: {answer}",
    "Come up with a question that has this answer: {answer}",
    "Answer: {answer}\nWhat was the question?",
    "Here is an answer from the text.\n{answer}\nWrite the question it answers.",
    "Generate a question for the following answer.\n{answer}",
    "{answer}\n\nWhat question could this be the answer to?",
    'Given the answer "{answer}", ask the matching question.',
    "Work backwards from this answer to a question: {answer}",
    "Pose a question about the text that is answered by: {answer}",
    "Response: {answer}\nWhich question does this respond to?",
]
_QA_GENERATE = ["Ask a question about the text above.", "Write a question based on the passage.",
                "What is a good question to ask about this article?", "Generate one question that the text answers.",
                "Come up with a quiz question about the text above."]  # fmt: skip
_QA_SEPARATORS = [("\n\n\n", 45), ("\n\n", 43), ("\n", 9), ("\n-----\n", 2), ("\n------\n", 1)]


# -- building blocks: multiple choice ----------------------------------------------------------------
_MC_ASKS = [
    "{question}{options_}",
    "{question}{options_}\nAnswer with one of the options.",
    "Choose the best answer.\n{question}{options_}",
    "{question}{options_}\nWhich option is correct?",
    "Multiple choice: {question}{options_}",
    "Answer the multiple-choice question below.\n\n{question}{options_}",
    "Select the right answer to this question: {question}{options_}",
    "Here is a question with several options.\n{question}{options_}",
    "{question}{options_}\nYour choice?",
    "Read the question and the options, then answer.\n{question}{options_}",
    "Quiz: {question}{options_}",
    "{question}{options_}\nOnly one option is right.",
    "Based on the text, pick an option.\n{question}{options_}",
    "Pick the correct option for this question: {question}{options_}",
]
_MC_REPLIES = ["Answer: ", "", "The correct option is ", "A: ", "Correct answer: ", "I'd choose ", "Choice: "]
# Wording that only makes sense next to options, and what the options-hidden variant says instead.
_HIDE_WORDING = [
    ("Answer with one of the options.", "Answer in a few words."),
    ("Choose the best answer.", "Give the best answer."),
    ("Which option is correct?", "What is the correct answer?"),
    ("Multiple choice: ", "Short answer: "),
    ("the multiple-choice question", "the question"),
    ("Select the right answer", "Give the right answer"),
    ("a question with several options", "a question to answer"),
    ("the question and the options", "the question"),
    ("Your choice?", "Your answer?"),
    ("Only one option is right.", "One short answer, please."),
    ("pick an option", "answer the question"),
    ("Pick the correct option for", "Find the correct answer to"),
    ("The correct option is ", "The answer is "),
    ("I'd choose ", "I'd say "),
    ("Choice: ", "Reply: "),
]


# -- building blocks: chain of thought ---------------------------------------------------------------
_COT_ASKS = [
    "{question}",
    "{question}\nLet's think step by step.",
    "{question} Think it through before answering.",
    "Answer the question step by step.\n{question}",
    "{question}\nExplain your reasoning, then give the answer.",
    "Question: {question}\nReason carefully.",
    "Work out the answer with reasoning: {question}",
    "{question}\nShow your work.",
    "Think carefully about the text and answer: {question}",
    "{question}\nGive a rationale first, then the answer.",
    "Solve this, explaining each step.\n{question}",
    "{question}\nWalk me through it.",
    "Use reasoning to answer the following.\n\n{question}",
    "{question}\nBriefly justify your answer.",
]
_COT_LEADS = ["", "Let's think step by step. ", "Reasoning: ", "Let me work through it. ", "", "Explanation: ",
              "Here is the reasoning. ", "Rationale: "]  # fmt: skip
_COT_CONCLUSIONS = [
    ". So the answer is {answer}.",
    ". Therefore, the answer is {answer}.",
    ". Thus, the answer is: {answer}",
    ".\nThe answer is {answer}.",
    ".\nFinal answer: {answer}",
    ".\nAnswer: {answer}",
    ". Hence the answer: {answer}",
    ". That means the answer is {answer}.",
    ". The final answer is {answer}.",
    ".\nSo: {answer}",
    ".\n\nTherefore: {answer}",
    ". Putting it together, the answer is {answer}.",
]
_COT_ANSWER_FIRST = [
    "Answer: {answer}\nReasoning: {cot}.",
    "{answer}\nExplanation: {cot}.",
    "The answer is {answer}.\nWhy: {cot}.",
    "Short answer: {answer}\nLonger explanation: {cot}.",
]
_COT_ONLY = ["Explain how to approach this question: {question}"]
# Inverted variants, by what is given -> what is asked for.
_COT_QA_TO_COT = [
    "Question: {question}\nAnswer: {answer}\nExplain why this is the answer.",
    "Explain why the answer to the question below is {answer}.\n{question}",
    "{question}\nThe answer is {answer}. Justify it.",
    "Here is a question and its answer.\nQ: {question}\nA: {answer}\nWhat reasoning leads to this answer?",
    'Why is "{answer}" the right answer to this question? {question}',
    "Write the rationale for this question and answer.\n{question}\n{answer}",
    "{question}\nAnswer: {answer}\nGive the reasoning behind this answer.",
    "Justify the answer {answer} to the following question.\n{question}",
]
_COT_RATIONALES = ["{cot}.", "Reasoning: {cot}.", "Explanation: {cot}.", "Here is why: {cot}.", "Rationale: {cot}."]
_COT_COT_TO_QA = [
    "Reasoning: {cot}.\nWhat question and answer does this reasoning support?",
    "{cot}.\nWrite a question and its answer that follow from this reasoning.",
    "Here is a line of reasoning: {cot}.\nWhat was the question, and what is the answer?",
    "Consider this rationale.\n{cot}.\nReconstruct the question and answer.",
    "Rationale: {cot}.\nQuestion and answer:",
    "Based on this explanation, state the question and the answer it leads to.\n{cot}.",
]
_COT_QA_PAIRS = ["Question: {question}\nAnswer: {answer}", "Q: {question}\nA: {answer}",
                 "The question: {question}\nThe answer: {answer}", "{question} Answer: {answer}"]  # fmt: skip
_COT_ANSWER_COT_TO_Q = [
    "Answer: {answer}\nRationale: {cot}.\nWhat was the question?",
    "The answer is {answer}, reached as follows: {cot}.\nWrite the question.",
    "{cot}. So the answer is {answer}.\nWhat question is being answered?",
    "Reasoning: {cot}.\nAnswer: {answer}\nWhat could the question be?",
    "Here is an answer with its explanation.\n{answer}\n{cot}.\nWhich question does it address?",
    "Work backwards: the answer {answer} comes from this reasoning: {cot}. What is the question?",
]
_COT_QUESTIONS = ["{question}", "Question: {question}", "Q: {question}", "The question: {question}"]
_COT_ANSWER_TO_COT_Q = [
    "The answer is {answer}. Write a question and the reasoning that leads to this answer.",
    "Answer: {answer}\nCome up with a question and a step-by-step explanation for this answer.",
    "Create a question, with a rationale, whose answer is {answer}.",
    "Given the answer {answer}, write the reasoning and the question.",
    "{answer}\nWhat question and reasoning could lead to this answer?",
    "Make up a question with reasoning so that the answer is: {answer}",
]
_COT_REASONED_QUESTIONS = ["Reasoning: {cot}.\nQuestion: {question}", "{cot}.\nThe question: {question}",
                           "Question: {question}\nReasoning: {cot}.", "Rationale: {cot}.\nQ: {question}"]  # fmt: skip
# Additions for multiple choice with a rationale.
_MC_COT_ASKS = [
    "{question}{options_}\nReason about each option, then pick one.",
    "Look at the options and think step by step.\n{question}{options_}",
    "{question}\nWhich of the following is right? Explain.{options_}",
]
_MC_COT_CONCLUSIONS = [". So the correct option is {option_answer}.", ".\nThe best choice is {option_answer}.",
                       ". Therefore, pick {option_answer}.", ".\nCorrect option: {option_answer}"]  # fmt: skip
_MC_COT_ONLY = [
    "Explain how to approach this question: {question}{options_}",
    "{question}{options_}\nDiscuss the options without naming the answer.",
]


# -- generators --------------------------------------------------------------------------------------
def _qa_patterns() -> list[PairPattern]:
    shapes: list[PairPattern] = []
    for i, (q, a) in enumerate(_QA_LABELS):
        shapes.append(PairPattern("{question}", "{answer}", q, a, "\n"))
        shapes.append(PairPattern("{question}", "{answer}", q, a, [" ", "\n\n"][i % 2]))
    shapes += [PairPattern("{question}", "{answer}", x_y_delimiter=d) for d in ("\n", "\n\n", " ")]
    delims = ["\n", "\n", " ", "\n", "\n\n"]
    for n, ask, reply in _rotate(_QA_ASKS, _QA_REPLIES, 2):
        shapes.append(PairPattern(ask, "{answer}", targets_prefix=reply, x_y_delimiter=delims[n % len(delims)]))
    for i, ask in enumerate(_QA_INVERTED):
        shapes.append(PairPattern(ask, "{question}", targets_prefix=["", "Question: ", "Q: "][i % 3]))
    for i, ask in enumerate(_QA_GENERATE):
        shapes.append(PairPattern(ask, "{question}", targets_prefix=["", "Question: "][i % 2]))
    shapes = _unique(shapes)
    seps = _spread(len(shapes), _QA_SEPARATORS)
    return [
        PairPattern(p.inputs, p.targets, p.inputs_prefix, p.targets_prefix, p.x_y_delimiter, sep)
        for p, sep in zip(shapes, seps, strict=True)
    ]


def _hide(text: str) -> str:
    text = text.replace("{options_}", "").replace("{option_answer}", "{answer}")
    for shown, hidden in _HIDE_WORDING:
        text = text.replace(shown, hidden)
    return text


def _options_patterns() -> list[PairPattern]:
    delims = ["\n", "\n", "\n\n", "\n", " "]
    shown = [
        PairPattern(ask, "{option_answer}", targets_prefix=reply, x_y_delimiter=_delim(ask, delims[n % len(delims)]))
        for n, ask, reply in _rotate(_MC_ASKS, _MC_REPLIES, 2)
    ]
    hidden = [
        PairPattern(_hide(p.inputs), _hide(p.targets), _hide(p.inputs_prefix), _hide(p.targets_prefix), p.x_y_delimiter)
        for p in shown
    ]
    return _unique(shown) + _unique(hidden)


def _with_options(template: str) -> str:
    """A chain-of-thought template turned multiple choice: options after the question, the option as answer."""
    if "{question} " in template:  # an inline cue after the question moves below the options
        template = template.replace("{question} ", "{question}{options_}\n")
    else:
        template = template.replace("{question}", "{question}{options_}")
    return template.replace("{answer}", "{option_answer}")


def _delim(inputs: str, delimiter: str) -> str:
    """No inline target right after an options block (its items may stand on lines of their own)."""
    return "\n" if delimiter == " " and inputs.endswith("{options_}") else delimiter


def _cot_patterns(options: bool, inverted_per: int) -> list[PairPattern]:
    conv = _with_options if options else (lambda t: t)
    asks = [conv(t) for t in _COT_ASKS] + (_MC_COT_ASKS if options else [])
    conclusions = [conv(t) for t in _COT_CONCLUSIONS] + (_MC_COT_CONCLUSIONS if options else [])
    delims = ["\n", "\n", "\n\n", "\n", " "]
    out: list[PairPattern] = []
    # question -> rationale, then the answer
    for n, ask, conclusion in _rotate(asks, conclusions, 9):
        leads = _COT_LEADS[n % len(_COT_LEADS) :] + _COT_LEADS  # the first that the ask does not already say
        lead = next(x for x in leads if not x or x.strip() not in ask)
        out.append(PairPattern(ask, lead + "{cot}" + conclusion, x_y_delimiter=_delim(ask, delims[n % len(delims)])))
    for _, target, ask in _rotate([conv(t) for t in _COT_ANSWER_FIRST], asks[1:], 2):
        out.append(PairPattern(ask, target))
    for ask in _MC_COT_ONLY if options else _COT_ONLY:
        out.append(PairPattern(ask, "{cot}."))
    # inverted: (question, answer) -> rationale; rationale -> (question, answer); (answer, rationale) -> question;
    # answer -> (rationale, question). The last keeps the answer's text when the options are shown.
    for _, ask, target in _rotate(_COT_QA_TO_COT, _COT_RATIONALES, inverted_per + 1):
        out.append(PairPattern(conv(ask), target))
    for _, ask, target in _rotate(_COT_COT_TO_QA, _COT_QA_PAIRS, inverted_per):
        out.append(PairPattern(ask, conv(target)))
    for _, ask, target in _rotate(_COT_ANSWER_COT_TO_Q, _COT_QUESTIONS, inverted_per):
        out.append(PairPattern(conv(ask), conv(target), x_y_delimiter="\n\n" if target == "{question}" else "\n"))
    for _, ask, target in _rotate(_COT_ANSWER_TO_COT_Q, _COT_REASONED_QUESTIONS, inverted_per):
        out.append(PairPattern(ask, conv(target)))
    return _unique(out)


# -- the tables --------------------------------------------------------------------------------------
PAIR_FAMILIES: dict[str, list[PairPattern]] = {
    "qa": _qa_patterns(),
    "qa_options": _options_patterns(),
    "qa_cot": _cot_patterns(options=False, inverted_per=3),
    "qa_options_cot": _cot_patterns(options=True, inverted_per=4),
}
