"""The text blocks of the templify stage's tables: reading intros, comprehension lead-ins, text and QA
intros, option blocks, dialogs, numbered questions, inline few-shot patterns and next-turn patterns,
generated from the short phrase lists below (our own wording; the reference's table sizes are reached, see
:mod:`.templify_patterns`, which holds the pair families and the shared helpers).
"""

from __future__ import annotations

from .templify_patterns import PAIR_FAMILIES, _labels, _rotate, _spread, _unique

# -- building blocks: texts, intros and lead-ins -----------------------------------------------------
_READ_SENTENCES = [
    "Read the following passage.", "Read this article and answer the questions that follow.", "Here is a text.",
    "Consider the passage below.", "Please read the text below.", "The following is an article.",
    "Study the passage carefully.", "Below is a document.", "Take a look at this text.",
    "Read the text, then answer.", "Here is an excerpt.", "The passage is given below.",
    "Here is a piece of writing.", "Go through this article first.",
    "Read the document below carefully.", "Look at the following text.", "This is the reading for today.",
    "Read this passage before answering.", "Here is a short reading.", "Go over the following article.",
    "Start by reading this text.", "The text for the questions is below.", "Here is an article to read.",
    "First, read the passage.",
]  # fmt: skip
_READ_LABELS = ["Article", "Passage", "Text", "Document", "Context", "Reading", "Background", "Excerpt"]
_READ_COLON = ["Here is a text: ", "Read this article: ", "Consider the following passage: ", "Here is the document: "]

_REFS = ["the text above", "the passage", "the article", "what you just read", "the text", "this document"]
_COMPRE_STATEMENTS = [
    "Answer questions based on {ref}", "Now answer these questions about {ref}",
    "Answer the following questions using {ref}", "Use {ref} to answer the questions below",
    "Respond to these questions about {ref}", "Questions about {ref}", "Here are some questions on {ref}",
    "Check your understanding of {ref}", "Test your comprehension of {ref}", "Some questions to answer from {ref}",
    "Reading comprehension questions on {ref}", "Answer these using only {ref}", "Quiz on {ref}",
    "Based on {ref}, answer the following",
]  # fmt: skip
_COMPRE_QUESTIONS = [
    "What are the answers to these questions about {ref}?", "Can you answer these questions about {ref}?",
    "How would you answer these questions on {ref}?", "Do you know the answers to these questions about {ref}?",
    "Can you use {ref} to answer the questions below?", "How well did you understand {ref}?",
    "What does {ref} tell us about the following?",
]  # fmt: skip
_COMPRE_ENDINGS = [":", "", ".", ":"]
_COMPRE_PLAIN = ["Now answer these questions:", "Questions:", "Answer the following:", "Try these questions",
                 "Time for some questions!", "Let's check what you learned:"]  # fmt: skip

_NOUNS = [("a passage", "passage"), ("an article", "article"), ("a text", "text"), ("a document", "document"),
          ("a short essay", "essay")]  # fmt: skip
_TEXT_ASKS = [
    "Write {a_noun} that answers the questions above.",
    "Compose {a_noun} from which these questions could be answered.",
    "Now write {a_noun} that covers these questions and answers.",
    "Write the {noun} that these questions were based on.",
    "Produce {a_noun} consistent with the Q&A above.",
    "Create {a_noun} that contains the answers above.",
    "Here is {a_noun} that answers the questions above:",
    "Draft {a_noun} relevant to the questions above.",
    "Generate {a_noun} that the questions above could be about.",
    "Given these questions and answers, write a matching {noun}.",
    "What {noun} could these questions come from?",
    "Write {a_noun} on the same topic as the questions above.",
]
_TEXT_JOINERS = [(" ", 37), ("\n", 15), ("\n\n", 7)]

_QA_INTRO_HEADS = [
    "Here are some questions and answers about {a_noun}:",
    "Questions and answers based on {a_noun}:",
    "The following Q&A pairs were written about {a_noun}.",
    "Read these questions and answers about {a_noun}.",
    "Some questions about {a_noun}, with answers:",
    "Below are questions answered using {a_noun}.",
    "Q&A on {a_noun}:",
    "These questions come with answers taken from {a_noun}.",
]
_QA_INTRO_TAILS = [
    "These Q&A pairs come from {a_noun}.",
    "The questions above are about {a_noun}.",
    "All of these were answered from {a_noun}.",
]


# -- building blocks: option blocks ------------------------------------------------------------------
_OPTION_HEADERS = ["Options:", "Choices:", "Pick one:", "Select from:", "Answer choices:", "Possible answers:",
                   "Choose from:", "Select one:", "Options are:"]  # fmt: skip
_BULLETS = ["- ", "* ", "• ", "+ ", "– ", "— ", "· ", "> ", "-> ", "▪ ", "◦ ", "o "]
_ITEM_FORMATS = ["\n{l}. ", "\n{l}) ", "\n({l}) ", "\n[{l}] ", "\n{l}: ", "\n{l} - ", "\nOption {l}: ",
                 "\nChoice {l}: ", "\n<{l}> ", " ({l}) ", " {l}) ", " {l}. ", " [{l}] ", " {l}: ", " Option {l}: ",
                 " <{l}> "]  # fmt: skip
_ROMAN_FORMATS = ["\n{l}. ", "\n{l}) ", "\n({l}) ", "\n[{l}] ", " ({l}) ", " {l}) ", "\n{l}: ", " [{l}] "]
_NONE_PHRASES = [
    "None of the above", "None of these", "None of the options", "None of the choices", "None of them",
    "None of the listed answers", "Not enough information", "Not enough info", "Insufficient information",
    "It cannot be determined from the text", "Cannot be determined", "Cannot say", "Can't tell",
    "Impossible to say", "No answer is given", "No correct answer is listed", "There is no correct option",
    "Unknown", "Unanswerable", "Undetermined", "Unclear from the text", "No information is given",
    "The question cannot be answered", "It is not possible to answer", "Nothing in the text answers this",
    "The answer is not in the text", "There is no way to know", "The text gives no answer",
    "Not answerable from the passage", "None is correct",
]  # fmt: skip
_NONE_VERBS = ["Not stated", "Not mentioned", "Not specified", "Not given"]
_NONE_SOURCES = ["the text", "the passage", "the article"]


# -- building blocks: dialogs, numbered questions, inline examples, next turn ------------------------
_DIALOG_NAMES = ["Conversation", "Dialogue", "Chat log", "Discussion", "Transcript", "Exchange", "Chat"]
_DIALOG_EXTRA = ["A conversation about the passage:", "Here is a chat about the article:"]
_SAME_SPEAKERS = [*_BULLETS, "=> ", ">> ", "~ ", "» ", "› ", "▸ ", "→ ", "| ", "-- ", "# ", "Speaker: "]
_ROLE_PAIRS = [
    ("User", "Assistant"), ("Student", "Teacher"), ("Q", "A"), ("Human", "AI"), ("Person A", "Person B"),
    ("Speaker 1", "Speaker 2"), ("Learner", "Tutor"), ("Reader", "Expert"), ("Customer", "Agent"),
    ("Interviewer", "Guest"), ("Questioner", "Responder"), ("Child", "Parent"), ("Novice", "Mentor"),
    ("User", "Bot"), ("Alice", "Bob"), ("X", "Y"), ("A", "B"), ("Visitor", "Guide"), ("Caller", "Operator"),
    ("Friend 1", "Friend 2"), ("Human", "Assistant"), ("Person 1", "Person 2"), ("Client", "Advisor"),
    ("Trainee", "Trainer"), ("Pupil", "Tutor"), ("Asker", "Answerer"), ("Me", "You"),
]  # fmt: skip
_ROLE_FORMATS = ["{}: ", "{}: ", "{}: ", "[{}] ", "{}: ", "{}: ", "<{}> ", "{}: ", "{} - "]

_NUMBERED_FORMATS = ["\n{l}. ", "\n{l}) ", "\n({l}) ", "\n[{l}] ", "\n{l}: ", "\n{l} - ", "\n\n{l}. ", "\n\n{l}) ",
                     " {l}. ", " ({l}) ", " {l}) ", " [{l}] ", " {l}: "]  # fmt: skip
_NUMBERED_EXTRA = ["\nQ{l}: ", "\nQ{l}. ", "\n#{l} "]
_NUMBERED_QUESTION_HEADS = ["Answer these questions:", "Questions:", "Now answer the following questions:",
                            "Answer the questions below using the text:", "Some questions about the text:"]  # fmt: skip
_NUMBERED_ANSWER_HEADS = ["Answers:", "Answer key:", "The answers:", "Solutions:", "Responses:"]

_INLINE_INTROS = [  # intro before the context
    "Use the passage to solve the problems.\n{context}\n\n",
    "Read the text, then work through the questions that follow.\n\n{context}\n\n",
    "Here is some background:\n{context}\n\n",
    "Study this text before the exercises.\n{context}\n\n",
    "Passage:\n{context}\n\nExercises:\n\n",
]
_INLINE_OUTROS = [  # context first
    "{context}\n\nSolve these, following the examples:\n\n",
    "{context}\n\nAnswer in the same way as the worked examples.\n\n",
    "{context}\n\nPractice questions:\n\n",
    "{context}\n\nUsing the text above, complete the tasks below.\n\n",
    "{context}\n\nWorked examples first, then one for you:\n\n",
]
_INLINE_LABELS = [  # (input, output, explanation)
    ("Problem", "Solution", "Explanation"), ("Question", "Answer", "Reason"), ("Input", "Output", "Rationale"),
    ("Q", "A", "Why"), ("Task", "Result", "Reasoning"), ("Query", "Reply", "Justification"),
    ("Exercise", "Answer", "Working"), ("Prompt", "Response", "Explanation"), ("Question", "Solution", "Steps"),
    ("Puzzle", "Solution", "How it works"),
]  # fmt: skip
_INLINE_SEPARATORS = ["\n\n", "\n\n", "\n", "\n\n", "\n\n", "\n", "\n\n", "\n\n", "\n", "\n\n"]

_NEXT_TURN_ASKS = [
    "Read the conversation about the text above and give the next reply.",
    "Continue the dialogue below, based on the text.",
    "Here is a chat about the article. What comes next?",
    "The conversation below discusses the passage. Write the next turn.",
    "What is the most fitting reply to continue this conversation?",
    "Given the text, respond to the last message in this dialogue.",
    "Complete the conversation about the text.",
    "How should the next speaker respond?",
    "Below is a discussion of the text above. Supply the next reply.",
]
_NEXT_TURN_LABELS = ["Next reply: ", "Reply: ", "Next: ", "Response: ", "Answer: ", ""]
_PREVIOUS_TURN_ASKS = [
    "Here is the final reply in a dialogue about the text: {answer}\nWrite the dialogue before it.",
    "A conversation about the passage ends with this reply: {answer}\nWhat was said before?",
    "Final message: {answer}\nReconstruct the conversation that led to it.",
    'Write a dialogue about the text that ends with the reply "{answer}".',
    "This is the last turn of a chat about the article: {answer}\nFill in the earlier turns.",
    "Given the closing reply {answer}, write the conversation leading up to it.",
]


def _read_intros() -> list[str]:
    joiners = ["\n", "\n\n", " "]
    framed = [s + joiners[(i + k) % 3] + "{context}" for i, s in enumerate(_READ_SENTENCES) for k in range(2)]
    framed += [label + [": ", ":\n"][i % 2] + "{context}" for i, label in enumerate(_READ_LABELS)]
    framed += [lead + "{context}" for lead in _READ_COLON]
    framed = _unique(framed)
    return ["{context}"] * len(framed) + framed


def _compre_leads() -> list[str]:
    leads: list[str] = []
    for n, head, ref in _rotate(_COMPRE_STATEMENTS, _REFS, 4):
        leads.append(head.replace("{ref}", ref) + _COMPRE_ENDINGS[n % len(_COMPRE_ENDINGS)])
    leads += [head.replace("{ref}", ref) for _, head, ref in _rotate(_COMPRE_QUESTIONS, _REFS, 4)]
    leads = _unique(leads + _COMPRE_PLAIN)
    return [""] * len(leads) + leads


def _fill_noun(template: str, noun: tuple[str, str]) -> str:
    return template.replace("{a_noun}", noun[0]).replace("{noun}", noun[1])


def _text_intros() -> list[str]:
    asks = _unique(_fill_noun(t, noun) for t in _TEXT_ASKS for noun in _NOUNS)
    joiners = _spread(len(asks), _TEXT_JOINERS)
    return ["{context}", *(ask + joiner + "{context}" for ask, joiner in zip(asks, joiners, strict=True))]


def _qa_intros() -> list[str]:
    out = ["{qa_demos}"]
    for n, head, noun in _rotate(_QA_INTRO_HEADS, _NOUNS, 4):
        out.append(_fill_noun(head, noun) + ("\n\n" if n % 4 == 3 else "\n") + "{qa_demos}")
    for _, tail, noun in _rotate(_QA_INTRO_TAILS, _NOUNS, 3):
        out.append("{qa_demos}\n" + _fill_noun(tail, noun))
    return _unique(out)


def _option_starts() -> list[str]:
    return _unique([*("\n" + h for h in _OPTION_HEADERS), *(" " + h for h in _OPTION_HEADERS[:7]),
                    "\nAvailable options:", "\nThe options are:", ""])  # fmt: skip


def _option_item_styles() -> list[list[str]]:
    bullets = [["\n" + b] * 26 for b in _BULLETS] + [[" " + b] * 26 for b in _BULLETS if b != "o "]
    romans = [_labels(f, kind) for f in _ROMAN_FORMATS for kind in ("roman", "roman_lower")]
    letters = [_labels(f, kind) for f in _ITEM_FORMATS for kind in ("upper", "lower", "number")]
    return bullets + romans + letters


def _none_of_these() -> list[str]:
    phrases = _unique([*_NONE_PHRASES, *(f"{v} in {s}" for v in _NONE_VERBS for s in _NONE_SOURCES)])
    return _unique(phrases + [p.lower() for p in phrases])


def _dialog_headers() -> list[str]:
    return _unique(["", *(n + ":" for n in _DIALOG_NAMES), *(n + " about the text:" for n in _DIALOG_NAMES),
                    *_DIALOG_EXTRA])  # fmt: skip


def _speakers() -> list[tuple[str, str]]:
    same = [(s, s) for s in _SAME_SPEAKERS]
    different = [(_ROLE_FORMATS[i % len(_ROLE_FORMATS)].format(a), _ROLE_FORMATS[i % len(_ROLE_FORMATS)].format(b))
                 for i, (a, b) in enumerate(_ROLE_PAIRS)]  # fmt: skip
    return _unique(same + different)


def _numbered_styles() -> list[list[str]]:
    kinds = ("number", "upper", "lower", "roman", "roman_lower")
    return [_labels(f, k) for f in _NUMBERED_FORMATS for k in kinds] + [_labels(f, "number") for f in _NUMBERED_EXTRA]


def _numbered_patterns() -> list[str]:
    out = []
    for i in range(10):
        gap = ["\n\n", "\n"][i // 5]
        q = _NUMBERED_QUESTION_HEADS[i % 5]
        a = _NUMBERED_ANSWER_HEADS[(i + i // 5) % 5]
        out.append("{context}" + gap + q + "{numbered_questions}" + gap + a + "{numbered_answers}")
    out.append("{context}\n\nHere are some answers about the text:{numbered_answers}\n\n"
               "Write the questions they answer:{numbered_questions}")  # fmt: skip
    return _unique(out)


def _inline(explain: bool) -> list[dict[str, str]]:
    contexts = [t for pair in zip(_INLINE_INTROS, _INLINE_OUTROS, strict=True) for t in pair]
    out = []
    for i, context in enumerate(contexts):
        inp, outp, why = _INLINE_LABELS[(i + (0 if explain else 3)) % len(_INLINE_LABELS)]
        ex_output = f"{outp}: {{output}}" + (f"\n{why}: {{explanation}}" if explain else "")
        out.append({
            "context": context,
            "ex_input": f"{inp}: {{input}}\n",
            "ex_output": ex_output,
            "test_input": f"{inp}: {{input}}\n",
            "test_output": f"{outp}: {{output}}",
            "example_separator": _INLINE_SEPARATORS[i],
        })  # fmt: skip
    return out


def _next_turn() -> list[str]:
    out = []
    for i, ask in enumerate(_NEXT_TURN_ASKS):
        label = _NEXT_TURN_LABELS[i % len(_NEXT_TURN_LABELS)]
        if i % 3 == 2:  # the question after the dialog
            out.append("{context}\n\n{dialog_}\n" + ask + "\n" + label + "{answer}")
        else:
            out.append("{context}\n\n" + ask + "\n{dialog_}\n" + label + "{answer}")
    for i, ask in enumerate(_PREVIOUS_TURN_ASKS):
        out.append("{context}\n\n" + ask + "\n" + ["", "Conversation:\n", "Dialogue:\n"][i % 3] + "{dialog_}")
    return _unique(out)


READ_INTROS: list[str] = _read_intros()
READ_ENDS: list[str] = [" ", "\n", "\n\n"]
COMPRE_LEADS: list[str] = _compre_leads()
TEXT_INTROS: list[str] = _text_intros()
QA_INTROS: list[str] = _qa_intros()
QA_ENDS: list[str] = [" ", "\n", "\n", "\n\n", "\n\n", "\n\n", "\n\n", "\n\n\n"]

OPTION_STARTS: list[str] = _option_starts()
OPTION_ITEM_STYLES: list[list[str]] = _option_item_styles()
OPTION_ITEM_ENDS: list[list[str]] = [[""] * 26, [";"] * 26, [""] * 26]
NONE_OF_THESE: list[str] = _none_of_these()

DIALOG_HEADERS: list[str] = _dialog_headers()
DIALOG_SEPS: list[str] = ["\n\n", "\n", " ", " | "]
SPEAKERS: list[tuple[str, str]] = _speakers()
DIALOG_ENDS: list[str] = ["\n", " ", ";\n"]
DIALOG_EXAMPLE_SEPS: list[str] = ["\n", "\n\n"]

NUMBERED_STYLES: list[list[str]] = _numbered_styles()
NUMBERED_PATTERNS: list[str] = _numbered_patterns()
INLINE_EXPLAIN: list[dict[str, str]] = _inline(explain=True)
INLINE_PLAIN: list[dict[str, str]] = _inline(explain=False)
NEXT_TURN: list[str] = _next_turn()


TABLES = ("READ_INTROS", "READ_ENDS", "COMPRE_LEADS", "TEXT_INTROS", "QA_INTROS", "QA_ENDS", "OPTION_STARTS",
           "OPTION_ITEM_STYLES", "OPTION_ITEM_ENDS", "NONE_OF_THESE", "DIALOG_HEADERS", "DIALOG_SEPS", "SPEAKERS",
           "DIALOG_ENDS", "DIALOG_EXAMPLE_SEPS", "NUMBERED_STYLES", "NUMBERED_PATTERNS", "INLINE_EXPLAIN",
           "INLINE_PLAIN", "NEXT_TURN")  # fmt: skip


def counts() -> dict[str, int]:
    """The length of every table: the pair families (:mod:`.templify_patterns`, under their own names) and
    the text blocks of this module."""
    return {**{name: len(p) for name, p in PAIR_FAMILIES.items()}, **{name: len(globals()[name]) for name in TABLES}}
