"""templify: chain reconstruction, formats (variety, options, rationales, unanswerable), determinism,
nothing lost or duplicated, the raw split, resume, the execution backends, and the mixture's weights."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from synth_stage import rule_synth
from test_fanout import make_raw

from ipt_hpc.atomic import read_json
from ipt_hpc.config import MixGroup, load_config
from ipt_hpc.errors import ConfigError, IptError, RecordError
from ipt_hpc.execution import StageRun, StageState, build, launch, run_stage, shard_name
from ipt_hpc.execution.submit import prepare
from ipt_hpc.records import RecordWriter, partial_path, read_records
from ipt_hpc.stages import templify
from ipt_hpc.stages.mixture import blend, converted
from ipt_hpc.stages.templify_formats import (
    LAYOUT_WEIGHTS_FEW,
    LAYOUT_WEIGHTS_MANY,
    Malformed,
    classify,
    draw_style,
    rng_for,
)


def rec(rid: str, chain: list[str], npairs: int) -> dict:
    pairs = [{"Q": f"Question {k} about {rid}?", "A": f"answer {k} of {rid}"} for k in range(npairs)]
    return {"id": rid, "text": f"Text of {rid}.", "chain": chain, "pairs": pairs}


# A handcrafted synthesize shard, in its record order (rounds are contiguous): slot 0 is a -> b -> c,
# where c got no pairs, so the slot's next document d starts a new chain (the chain breaks) and e
# extends it; slot 1 is f (no pairs, alone), then g -> h.
HANDMADE = [
    rec("a", [], 2),
    rec("f", [], 0),
    rec("b", ["a"], 1),
    rec("g", [], 2),
    rec("c", ["a", "b"], 0),
    rec("h", ["g"], 1),
    rec("d", [], 1),
    rec("e", ["d"], 3),
]


def write_synth(path: Path, records: list[dict]) -> Path:
    with RecordWriter(path) as w:
        w.write_many(records)
    return path


def test_chains_are_rebuilt_each_record_once(tmp_path: Path) -> None:
    path = write_synth(tmp_path / "s.jsonl.zst", HANDMADE)
    chains = templify.rebuild_chains(HANDMADE, path)
    ids = [[HANDMADE[i]["id"] for i in c] for c in chains]
    assert ids == [["f"], ["a", "b", "c"], ["g", "h"], ["d", "e"]]
    job = templify.TemplifyJob(seed=0, raw_stage=None)
    stats: dict = {}
    out = list(templify.texts_of_shard(job, path, None, stats))
    # an entry without pairs is cut out of its chain and becomes a plain text of its own (the reference)
    assert [o["docs"] for o in out] == [["f"], ["a", "b"], ["c"], ["g", "h"], ["d", "e"]]
    assert [o["pairs"] for o in out] == [0, 3, 0, 3, 4]
    assert [o["id"] for o in out] == ["f", "b", "c", "h", "e"]
    assert out[0]["text"] == "Text of f." and out[0]["format"] == "plain"
    assert out[2]["text"] == "Text of c." and out[2]["format"] == "plain"
    ab = out[1]["text"]  # few-shot: a's text and pairs, then b's
    assert "Text of c." not in ab
    if not out[1]["format"].endswith("inverted"):
        assert ab.index("Text of a.") < ab.index("Question 1 about a?") < ab.index("Text of b.")
    assert stats["pairs_in"] == stats["pairs"] == 10 and stats["texts_without_pairs"] == 2


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({5: rec("h", ["zz"], 1)}, "'zz', which is not an earlier record"),
        ({5: rec("h", ["c"], 1)}, "does not extend the chain of 'c'"),
        ({5: rec("h", ["a"], 1)}, "'a' is already continued by line 3"),
        ({2: rec("b", ["h"], 1)}, "'h', which is not an earlier record"),
    ],
)
def test_inconsistent_chains_name_the_record(tmp_path: Path, broken: dict, reason: str) -> None:
    records = [broken.get(i, r) for i, r in enumerate(HANDMADE)]
    path = write_synth(tmp_path / "s.jsonl.zst", records)
    with pytest.raises(RecordError) as err:
        list(templify.texts_of_shard(templify.TemplifyJob(seed=0, raw_stage=None), path, None, {}))
    line = next(i for i in broken) + 1
    assert f"s.jsonl.zst:{line}:" in str(err.value) and reason in str(err.value)


def style(seed: int = 0):
    return draw_style(random.Random(seed))


def test_reasoning_pairs_need_both_cues_in_place() -> None:
    st = style()
    rng = random.Random(1)
    ok = classify("How long is it?\nLet's think step by step.", "It has 3 words.\nTherefore, the answer is 3", st, rng)
    assert ok.family == "qa_cot" and ok.kind == "cot"
    assert ok.fields == {"question": "How long is it?", "answer": "3", "cot": "It has 3 words"}
    cases = {
        ("Let's think step by step.\nHow long?", "x\nTherefore, the answer is 3"): "cot_question_cue",
        ("How long?\nLet's think step by step.", "It has 3 words, so 3."): "cot_answer_cue",
        ("How long?", "a\nTherefore, the answer is 3\nTherefore, the answer is 4"): "cot_question_cue",
        ("How long?\nLet's think step by step.", "a\nTherefore, the answer is 3\nTherefore, the answer is 4"): (
            "cot_answer_cue"
        ),
        ("\nLet's think step by step.", "a\nTherefore, the answer is 3"): "cot_empty_part",
    }
    for (q, a), reason in cases.items():
        with pytest.raises(Malformed) as err:
            classify(q, a, st, rng)
        assert err.value.reason == reason, (q, a)


def test_multiple_choice_pairs_need_an_answer_among_the_options() -> None:
    from ipt_hpc.stages import templify_blocks as tb

    for seed in range(30):
        st = style(seed)
        rng = random.Random(seed)
        p = classify("Which is red?\nOptions:\n- grass\n- a tomato\n- the sky", "a tomato", st, rng)
        assert p.family == "qa_options" and p.fields["question"] == "Which is red?"
        block = p.fields["options_"]
        assert all(o in block for o in ("grass", "a tomato", "the sky")) and block.startswith(st.option_start)
        labels = st.option_items[:3]
        shown = sorted(("grass", "a tomato", "the sky"), key=block.index)
        right = labels[shown.index("a tomato")]
        assert p.fields["option_answer"] == (right.strip() if len(set(st.option_items)) == 26 else "a tomato")
        none = classify("Which is blue?\nOptions:\n- grass\n- fire", "None of the above", st, rng)
        assert none.fields["option_answer"] == st.none_phrase and st.none_phrase in tb.NONE_OF_THESE
        assert "None of the above" not in none.fields["options_"]  # the block is not extended
    for q, a, reason in [
        ("Which is red?\nOptions:\n- grass\n- sky", "a tomato", "answer_not_an_option"),
        ("Red?\nOptions:\n- a\n- b\nOptions:\n- c", "a", "options_marker_repeated"),
        ("\nOptions:\n- a\n- b", "a", "options_without_question"),
    ]:
        with pytest.raises(Malformed) as err:
            classify(q, a, style(), random.Random(0))
        assert err.value.reason == reason
    both = classify(
        "Red?\nOptions:\n- yes\n- no\nLet's think step by step.",
        "Look.\nTherefore, the answer is no",
        style(),
        random.Random(0),
    )
    assert both.family == "qa_options_cot" and both.fields["cot"] == "Look"


def test_malformed_pairs_are_dropped_or_kept_by_the_switch(tmp_path: Path) -> None:
    bad = {"Q": "Why?\nLet's think step by step.", "A": "Because."}
    records = [{"id": "a", "text": "Text of a.", "chain": [], "pairs": [bad, {"Q": "Fine?", "A": "Yes."}]}]
    path = write_synth(tmp_path / "s.jsonl.zst", records)
    for mode, rendered in (("drop", 1), ("keep", 2)):
        stats: dict = {}
        out = list(
            templify.texts_of_shard(templify.TemplifyJob(seed=0, raw_stage=None, malformed=mode), path, None, stats)
        )
        assert out[0]["pairs"] == rendered and stats["malformed"] == {"cot_answer_cue": 1}
        assert stats["pairs_dropped"] == 2 - rendered
        assert ("Because." in out[0]["text"]) == (mode == "keep")


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5 + 1


def test_layouts_inversion_and_drops_match_the_reference_over_10000_chains(tmp_path: Path) -> None:
    """10,000 synthetic chains: layout shares per chain kind, inversion, malformed drops by reason, the
    separator between entries and the spread over patterns, against the reference's probabilities."""
    from ipt_hpc.stages import templify_blocks as tb
    from ipt_hpc.stages import templify_patterns as tp

    rng = random.Random(5)
    records, valid, planted = [], {}, Counter()
    for c in range(10_000):
        ids: list[str] = []
        for e in range(rng.choice([1, 2, 2, 3])):
            rid = f"c{c}e{e}"
            valid[rid] = rng.choice([1, 1, 2, 3, 4])
            pairs = [{"Q": f"Question {k} of {rid}?", "A": f"answer {k}"} for k in range(valid[rid])]
            if rng.random() < 0.1:
                pairs.insert(0, {"Q": f"Why {rid}?\nLet's think step by step.", "A": "No conclusion."})
                planted["cot_answer_cue"] += 1
            if rng.random() < 0.1:
                pairs.append({"Q": f"Pick for {rid}?\nOptions:\n- x\n- y", "A": "z"})
                planted["answer_not_an_option"] += 1
            records.append({"id": rid, "text": f"Text {rid}.", "chain": list(ids), "pairs": pairs})
            ids.append(rid)
    path = write_synth(tmp_path / "s.jsonl.zst", records)
    stats: dict = {}
    out = list(templify.texts_of_shard(templify.TemplifyJob(seed=0, raw_stage=None), path, None, stats))
    assert stats["malformed"] == dict(planted) and stats["pairs_dropped"] == sum(planted.values())
    assert len(out) == 10_000 and stats["pairs"] == sum(valid.values())
    kinds: dict[str, Counter[str]] = {"few": Counter(), "many": Counter()}
    for o in out:
        kinds["many" if min(valid[d] for d in o["docs"]) >= 2 else "few"][o["format"].split("+")[0]] += 1
    for kind, weights in (("few", LAYOUT_WEIGHTS_FEW), ("many", LAYOUT_WEIGHTS_MANY)):
        n = sum(kinds[kind].values())
        assert n > 2000 and set(kinds[kind]) == set(weights), kinds[kind]
        for layout, w in weights.items():
            assert binomial_ok(kinds[kind][layout], n, w / sum(weights.values())), (kind, layout, kinds[kind])
    invertible = [o for o in out if o["format"].split("+")[0] in ("classic", "dialog")]
    assert binomial_ok(sum(o["format"].endswith("+inverted") for o in invertible), len(invertible), 0.05)
    # the separator between a chain's entries: the reference's shares (36, 34, 7 and 2 of its 79 patterns)
    styles = [draw_style(rng_for(f"id{i}", 0)) for i in range(10_000)]
    seps = Counter(s.chain_sep for s in styles)
    dashed = sum(v for k, v in seps.items() if "-" in k)
    for got, want in ((seps["\n\n\n"], 36 / 79), (seps["\n\n"], 34 / 79), (seps["\n"], 7 / 79), (dashed, 2 / 79)):
        assert abs(got / 10_000 - want) < 0.03, seps
    # variety: no pattern of a family, no intro or lead-in but the bare ones, takes over 3% of the texts
    for family in tp.PAIR_FAMILIES:
        top = Counter(s.patterns[family] for s in styles).most_common(1)[0][1]
        assert top / 10_000 < 0.03, family
    for table, bare in ((tb.READ_INTROS, "{context}"), (tb.COMPRE_LEADS, "")):
        draws = Counter(random.Random(i).choice(table) for i in range(10_000))
        assert 0.45 < draws[bare] / 10_000 < 0.55
        assert max(v for k, v in draws.items() if k != bare) / 10_000 < 0.03


# -- the stage ----------------------------------------------------------------------------------------
def make_synth(run: Path, n: int, share: float = 1.0) -> Path:
    launch(StageRun("synthesize", str(run), "synth", "raw", n, rule_synth, {"share": share}), "all", cfg().execution)
    return run


def cfg(**sets):
    return load_config(None, None, {"execution.backend": "debug", **sets})


def outputs(run: Path, n: int, folder: str = "augmented") -> list[dict]:
    return [r for k in range(n) for r in read_records(run / folder / shard_name(k, n))]


def test_stage_renders_every_pair_once_and_splits_raw_by_id(tmp_path: Path) -> None:
    run = make_synth(make_raw(tmp_path / "run", 2, docs=160), 2, share=0.6)
    run_stage(templify.STAGE, cfg(), run)
    out = outputs(run, 2)
    raw_ids = [r["id"] for k in range(2) for r in read_records(run / "raw" / shard_name(k, 2))]
    covered = Counter(d for o in out for d in o["docs"])
    assert sorted(covered) == sorted(raw_ids) and set(covered.values()) == {1}  # nothing lost, nothing twice
    for o in out:
        assert (o["group"] == "raw") == (not converted(o["id"], 0.6)), o["id"]
    synth = [r for k in range(2) for r in read_records(run / "synth" / shard_name(k, 2))]
    pairs_in = sum(len(r["pairs"]) for r in synth)
    firsts = [p["Q"] for r in synth for p in r["pairs"] if p["Q"].startswith("What is the first word")]
    text = "\n".join(o["text"] for o in out)
    assert all(text.count(q) == 1 for q in firsts) and len(firsts) > 50  # open questions: always rendered
    manifest = read_json(run / "augmented" / "manifest.json")
    t = manifest["totals"]
    assert t["pairs"] + t["pairs_dropped"] == t["pairs_in"] == pairs_in
    assert sum(o["pairs"] for o in out) == t["pairs"]
    assert t["malformed"] == {"cot_answer_cue": t["pairs_dropped"]} and t["pairs_dropped"] > 0
    assert t["raw_texts"] == sum(o["group"] == "raw" for o in out) > 0
    assert set(t["pair_kinds"]) == {"multiple_choice", "multiple_choice_cot", "cot", "open"}
    for chart in manifest["charts"]:
        assert (run / "augmented" / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(manifest["charts"]) == ["layouts.png", "pairs_per_text.png"]
    assert abs(sum(t["layouts"].values()) - 1) < 1e-3 and "classic" in t["layouts"]


def test_reruns_are_byte_identical_and_seed_changes_formats(tmp_path: Path) -> None:
    runs = [make_synth(make_raw(tmp_path / name, 1, docs=60), 1) for name in ("one", "two")]
    for run in runs:
        run_stage(templify.STAGE, cfg(), run)
    files = [(run / "augmented" / shard_name(0, 1)).read_bytes() for run in runs]
    assert files[0] == files[1]
    run_stage(templify.STAGE, cfg(**{"templify.seed": 5}), runs[1], force=True)
    assert (runs[1] / "augmented" / shard_name(0, 1)).read_bytes() != files[0]


def test_interrupted_templify_resumes_to_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = make_synth(make_raw(tmp_path / "ref", 1, docs=80), 1)
    run_stage(templify.STAGE, cfg(), ref)
    want = (ref / "augmented" / shard_name(0, 1)).read_bytes()
    run = make_synth(make_raw(tmp_path / "run", 1, docs=80), 1)
    prepare(build(templify.STAGE, cfg(), run))
    out = run / "augmented" / shard_name(0, 1)
    w = RecordWriter(out)
    w.write_many(list(read_records(ref / "augmented" / shard_name(0, 1)))[:20])
    w.flush()
    w.abandon()
    assert partial_path(out).exists()
    run_stage(templify.STAGE, cfg(), run)
    assert out.read_bytes() == want
    assert any(e["event"] == "resumed" and e["records"] == 20 for e in StageState(run / "augmented").events(out.name))


def test_templify_on_the_local_executor_and_cli(tmp_path: Path) -> None:
    from conftest import run_cli

    run = make_synth(make_raw(tmp_path / "run", 3, docs=90), 3)
    proc = run_cli("templify", "--run", str(run), "--executor", "local", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "augmented texts" in proc.stderr + proc.stdout
    assert len(outputs(run, 3)) == read_json(run / "augmented" / "manifest.json")["totals"]["records"]


def test_missing_synth_output_is_a_clear_error(tmp_path: Path) -> None:
    run = make_raw(tmp_path / "run", 1, docs=5)
    with pytest.raises(IptError, match="run synthesize first"):
        run_stage(templify.STAGE, cfg(), run)


# -- mixture ------------------------------------------------------------------------------------------
TOKENS = {
    "augmented": {"tokens": 200, "documents": 2, "prefix": "/r/tokens/augmented"},
    "raw": {"tokens": 800, "documents": 8, "prefix": "/r/tokens/raw"},
    "ft": {"tokens": 50, "documents": 1, "prefix": "/r/tokens/ft"},
}


def test_blend_weights_follow_repeat_and_share() -> None:
    groups = {"augmented": MixGroup(), "raw": MixGroup(), "ft": MixGroup(repeat=4)}
    out = blend(groups, TOKENS, train_tokens=2400)
    w = {g: r["weight"] for g, r in out["groups"].items()}
    assert w == pytest.approx({"augmented": 200 / 1200, "raw": 800 / 1200, "ft": 200 / 1200}, abs=1e-6)
    assert out["groups"]["ft"]["epochs"] == pytest.approx(8.0)  # 4x as often per token as the others (2.0)
    assert out["groups"]["raw"]["epochs"] == pytest.approx(2.0)
    assert out["data_path"][1::2] == ["/r/tokens/augmented", "/r/tokens/raw", "/r/tokens/ft"]
    fixed = blend({"augmented": MixGroup(share=0.5), "raw": MixGroup()}, TOKENS)
    assert fixed["groups"]["augmented"]["weight"] == 0.5 and fixed["groups"]["raw"]["weight"] == 0.5
    with pytest.raises(ConfigError, match=r"add up to 1\.200"):
        blend({"augmented": MixGroup(share=0.6), "raw": MixGroup(share=0.6)}, TOKENS)
    with pytest.raises(IptError, match="no tokenized group 'nope'"):
        blend({"nope": MixGroup()}, TOKENS)
    with pytest.raises(ConfigError, match="either repeat or share"):
        load_config(None, ["mixture.groups.raw.repeat=2", "mixture.groups.raw.share=0.5"])


def test_convert_share_is_deterministic_by_id() -> None:
    ids = [f"f.jsonl:{i}" for i in range(4000)]
    picked = [i for i in ids if converted(i, 0.2)]
    assert picked == [i for i in ids if converted(i, 0.2)]
    assert 0.17 < len(picked) / len(ids) < 0.23
    assert set(picked) != {i for i in ids if converted(i, 0.2, seed=1)}


def test_groups_tokenize_separately_and_the_mixture_report_reads_them(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from conftest import run_cli
    from tokenizer_fixture import train_tokenizer

    from ipt_hpc.stages import tokenize

    tok = train_tokenizer(tmp_path / "tok")
    run = make_synth(make_raw(tmp_path / "run", 2, docs=80), 2, share=0.5)
    run_stage(templify.STAGE, cfg(), run)
    out = outputs(run, 2)
    for group in ("augmented", "raw"):
        sets = {"tokenize.tokenizer": str(tok), "tokenize.record_group": group, "tokenize.workers": 1}
        result = run_stage(tokenize.STAGE, cfg(**sets), run)
        merged = result["manifest"]
        assert merged["group"] == group
        assert merged["documents"] == sum(o["group"] == group for o in out) > 0
        assert merged["other_group"] == len(out) - merged["documents"]
    sets = ["--set", "mixture.groups.augmented.repeat=2", "--set", "mixture.groups.raw.repeat=1"]
    proc = run_cli("mixture", "--run", str(run), *sets)
    assert proc.returncode == 0, proc.stderr
    report = read_json(run / "mixture.json")
    tokens = {g: read_json(run / "tokens" / g / "manifest.json")["tokens"] for g in ("augmented", "raw")}
    want = 2 * tokens["augmented"] / (2 * tokens["augmented"] + tokens["raw"])
    assert report["groups"]["augmented"]["weight"] == pytest.approx(want, abs=1e-6)
    assert report["data_path"][1] == str(run / "tokens" / "augmented")


def test_records_settings_reach_the_writers_of_every_stage(tmp_path: Path) -> None:
    from ipt_hpc.records import zstd_frames
    from ipt_hpc.stages import synthesize, tokenize

    sets = {"records.level": 19, "records.frame_bytes": 4096, "records.fsync": False}
    runs = {name: make_synth(make_raw(tmp_path / name, 1, docs=120), 1) for name in ("default", "set")}
    run_stage(templify.STAGE, cfg(), runs["default"])
    run_stage(templify.STAGE, cfg(**sets), runs["set"])
    files = {name: run / "augmented" / shard_name(0, 1) for name, run in runs.items()}
    assert list(read_records(files["set"])) == list(read_records(files["default"]))
    frames = {name: zstd_frames(f) for name, f in files.items()}
    assert len(frames["default"]) == 1 < len(frames["set"])  # 1 MiB frames vs 4 KiB frames
    assert all((size or 0) <= 4096 + 4096 for _, _, size in frames["set"][:-1])
    # the other per-shard stages build their StageRun from the same settings
    from tokenizer_fixture import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    c = cfg(**sets, **{"synth.model": "m", "tokenize.tokenizer": str(tok)})
    for run in (build(synthesize.STAGE, c, runs["set"]), build(tokenize.STAGE, c, runs["set"])):
        assert (run.level, run.frame_bytes, run.fsync) == (19, 4096, False)
