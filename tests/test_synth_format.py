"""The synthesizer's protocol: parsing generations, exact token budgets, multi-round chaining."""

from __future__ import annotations

from ipt_hpc.stages.synth_format import (
    Entry,
    Slot,
    advance,
    build_prompt,
    context_text,
    example_text,
    parse_pairs,
    rounds_of,
    stats_histogram,
)

BOS, EOS = 1, 2


def test_context_segment_has_the_leading_space() -> None:
    assert context_text("Some text.") == " <CON> Some text. </CON>\n\n"


def test_parse_realistic_generation() -> None:
    gen = (
        "<QUE> What is the capital of France? <ANS> Paris. </END>\n\n"
        "<QUE> Why is the sky blue?\n<ANS> Rayleigh scattering: shorter wavelengths scatter more. </END>\n\n"
        "<QUE> Is it"
    )
    pairs, dropped = parse_pairs(gen)
    assert pairs == [
        {"Q": "What is the capital of France?", "A": "Paris."},
        {"Q": "Why is the sky blue?", "A": "Rayleigh scattering: shorter wavelengths scatter more."},
    ]
    assert dropped == {"incomplete": 1}


def test_parse_malformed_generations() -> None:
    cases = {
        "<QUE> q1 <ANS> a1": ([], {"incomplete": 1}),  # missing </END>
        "<QUE> q <ANS> a <ANS> b </END>": ([], {"several_answer_tags": 1}),
        "<QUE> q without answer tag </END>": ([], {"no_answer_tag": 1}),
        "<QUE> q <ANS>    </END>": ([], {"empty_answer": 1}),
        "<QUE>   <ANS> a </END>": ([{"Q": "", "A": "a"}], {}),  # the reference keeps an empty question
        "Garbage <ANS> a </END>": ([], {"no_question_tag": 1}),  # a question must start with <QUE>
        "<QUE> q <QUE> r <ANS> a </END>": ([{"Q": "q  r", "A": "a"}], {}),  # every <QUE> is removed
        "<QUE> Straße? <ANS> a </END>\n\n<QUE> STRASSE? <ANS> b </END>": (  # lower(), not casefold()
            [{"Q": "Straße?", "A": "a"}, {"Q": "STRASSE?", "A": "b"}],
            {},
        ),
        "<QUE> Same Q? <ANS> a </END>\n\n<QUE> same q? <ANS> b </END>": (
            [{"Q": "Same Q?", "A": "a"}],
            {"duplicate_question": 1},
        ),
        "  \n<QUE>\t spaced  \n<ANS>\n answer \t</END>  \n\n ": ([{"Q": "spaced", "A": "answer"}], {}),
        "": ([], {}),
        "</END></END>": ([], {"no_answer_tag": 2}),
    }
    for gen, (want_pairs, want_dropped) in cases.items():
        pairs, dropped = parse_pairs(gen)
        assert pairs == want_pairs, gen
        assert dict(dropped) == want_dropped, gen


def test_strict_rules_also_drop_empty_and_doubly_tagged_questions() -> None:
    gen = "<QUE>   <ANS> a </END>\n\n<QUE> q <QUE> r <ANS> b </END>\n\n<QUE> fine? <ANS> c </END>"
    assert parse_pairs(gen, "strict") == ([{"Q": "fine?", "A": "c"}], {"bad_question": 2})
    assert len(parse_pairs(gen)[0]) == 3


def test_earlier_entries_are_rendered_from_their_parsed_pairs() -> None:
    pairs = [{"Q": "Who?", "A": "Ada."}, {"Q": "When?", "A": "1843."}]
    assert example_text("Text.", pairs) == (
        " <CON> Text. </CON>\n\n<QUE> Who? <ANS> Ada. </END>\n\n<QUE> When? <ANS> 1843. </END>"
    )


def test_rounds_split_contiguously() -> None:
    assert rounds_of(10, 3) == [range(0, 4), range(4, 8), range(8, 10)]
    assert rounds_of(2, 4) == [range(0, 1), range(1, 2)]
    assert rounds_of(0, 2) == []


def test_budget_boundary_fits_by_one_token_then_overflows_by_one() -> None:
    slot = Slot()
    first = Entry(0, [10, 11, 12], example_ids=[10, 11, 12, 20, 21], pairs=1)
    advance(slot, first, [])
    assert slot.chain_tokens == 2 + 5  # BOS example (ctx and pairs) EOS
    entry = Entry(1, [30, 31])
    max_new = 5
    exact = slot.chain_tokens + 1 + 2 + max_new  # prefix + BOS + ctx + max_new_tokens
    prompt, chained = build_prompt(slot, entry, bos=BOS, eos=EOS, max_model_len=exact, max_new_tokens=max_new)
    assert chained == [0]
    assert prompt == [BOS, 10, 11, 12, 20, 21, EOS, BOS, 30, 31]
    assert len(prompt) + max_new == exact  # fits exactly
    prompt, chained = build_prompt(slot, entry, bos=BOS, eos=EOS, max_model_len=exact - 1, max_new_tokens=max_new)
    assert chained == [] and prompt == [BOS, 30, 31]


def test_multi_round_chaining_on_a_handcrafted_case() -> None:
    # 3 rounds x 2 slots; slot 1's round-1 entry yields no pairs -> its round-2 doc starts a new chain;
    # slot 0's round-2 doc does not fit behind its chain -> new chain.
    docs = {0: [5] * 3, 1: [6] * 3, 2: [7] * 3, 3: [8] * 3, 4: [9] * 20, 5: [4] * 3}
    answers = {0: ([50] * 4, 2), 1: ([60] * 4, 1), 2: ([70] * 4, 1), 3: ([80] * 4, 0), 4: ([90], 1), 5: ([40], 1)}
    slots = [Slot(), Slot()]
    used: dict[int, list[int]] = {}
    for rnd in rounds_of(6, 3):
        for i, doc in enumerate(rnd):
            entry = Entry(doc, docs[doc])
            prompt, chained = build_prompt(slots[i], entry, bos=BOS, eos=EOS, max_model_len=40, max_new_tokens=8)
            assert len(prompt) + 8 <= 40
            used[doc] = chained
            answer, entry.pairs = answers[doc]
            entry.example_ids = docs[doc] + answer
            advance(slots[i], entry, chained)
    assert used == {0: [], 1: [], 2: [0], 3: [1], 4: [], 5: []}
    # slot 0 after round 2: doc 4 started a new chain (doc 0 + doc 2 + doc 4 would not fit)
    assert [e.doc for e in slots[0].chain] == [4]
    assert [e.doc for e in slots[1].chain] == [5]


def test_histogram() -> None:
    assert stats_histogram([0, 1, 1, 3, 12, 10]) == {"0": 1, "1": 2, "3": 1, "10+": 2}
