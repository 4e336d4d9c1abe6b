"""A rule-made stand-in for the synthesizer's *output files*, for testing what comes after synthesis.

``rule_synth`` writes records shaped exactly like the synthesize stage's (id, text, round, slot, chain,
pairs, ...), with chains decided by the real :mod:`ipt_hpc.stages.synth_format` logic (``rounds_of``,
``build_prompt``, ``advance``) and pairs made by rule from each text: open questions, multiple-choice
questions with an ``Options:`` block, answers with a rationale, unanswerable ones, and every fifth
document without pairs. It runs through the real execution layer as a stage of its own. It never
stands in for the synthesizer in the pipeline or the demo: tests of templify, tokenize and mixture
need pairs, and a tiny random model gives none.
"""

from __future__ import annotations

from typing import Any

from ipt_hpc.execution import ShardContext
from ipt_hpc.records import read_records
from ipt_hpc.stages.mixture import converted
from ipt_hpc.stages.synth_format import Entry, Slot, advance, build_prompt, rounds_of
from ipt_hpc.stages.synthesize import synth_record


def rule_pairs(doc: int, rid: str, text: str) -> list[dict[str, str]]:
    """Pairs in the released synthesizer's conventions (``Options:`` blocks, the reasoning cue)."""
    if doc % 5 == 0:
        return []
    words = text.split()
    w, n = (words + ["word"] * 4)[:4], len(words)
    pairs = [{"Q": f"What is the first word of document {rid}?", "A": w[0]}]
    kind = doc % 4
    cue = "\nLet's think step by step."
    if kind == 1:
        options = f"\nOptions:\n- {w[1]}\n- zeta{doc}\n- eta{doc}"
        pairs.append({"Q": f"Which word comes second in {rid}?{options}", "A": w[1]})
    elif kind == 2:
        pairs.append({"Q": f"Is {rid} about dragons?\nOptions:\n- yes\n- maybe", "A": "None of the above"})
    elif kind == 3:
        pairs.append({"Q": f"How long is {rid}?{cue}", "A": f"It has {n} words.\nTherefore, the answer is {n}"})
        options = "\nOptions:\n- yes\n- no"
        pairs.append(
            {"Q": f"Is {rid} long?{options}{cue}", "A": f"It has {n} words, not many.\nTherefore, the answer is no"}
        )
    if doc % 7 == 3:  # a reasoning cue without the answer's conclusion: malformed (dropped by templify)
        pairs.append({"Q": f"Why does {rid} exist?{cue}", "A": "Because someone wrote it."})
    return pairs


def rule_synth(cfg: dict[str, Any], ctx: ShardContext) -> dict[str, Any]:
    docs = [d for d in read_records(ctx.input_path) if converted(d["id"], cfg.get("share", 1.0))]
    writer = ctx.open_output()
    slots: dict[int, Slot] = {}
    budget = int(cfg.get("max_model_len", 10_000))
    for r, rnd in enumerate(rounds_of(len(docs), int(cfg.get("rounds", 3)))):
        for i, d in enumerate(rnd):
            slot = slots.setdefault(i, Slot())
            pairs = rule_pairs(d, docs[d]["id"], docs[d]["text"])
            entry = Entry(d, [0] * len(docs[d]["text"].split()))
            _, chained = build_prompt(slot, entry, bos=1, eos=2, max_model_len=budget, max_new_tokens=8)
            entry.example_ids, entry.pairs = entry.context_ids + [0] * 8, len(pairs)
            advance(slot, entry, chained)
            writer.write({**synth_record(docs, d, (r, i), chained, pairs), "error": None})
    return writer.close().to_json()
