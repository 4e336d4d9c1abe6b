"""templify: chain reconstruction, formats (variety, options, rationales, unanswerable), determinism,
nothing lost or duplicated, the raw split, resume, the execution backends, and the mixture's weights."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import pytest
from synth_stage import rule_synth
from test_fanout import make_raw

from ipt_hpc import templify
from ipt_hpc.atomic import read_json
from ipt_hpc.config import MixGroup, load_config
from ipt_hpc.errors import ConfigError, IptError, RecordError
from ipt_hpc.execution import StageRun, StageState, launch, shard_name
from ipt_hpc.execution.shards import prepare
from ipt_hpc.mixture import blend, converted
from ipt_hpc.records import RecordWriter, partial_path, read_records
from ipt_hpc.templify_formats import (
    NONE_OPTIONS,
    OPTION_LABELS,
    draw_format,
    render_entry,
    render_pair,
    rng_for,
    split_options,
    split_rationale,
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
    assert [o["docs"] for o in out] == ids
    assert [o["pairs"] for o in out] == [0, 3, 3, 4]
    assert out[0]["text"] == "Text of f." and out[0]["format"] == "plain"  # no pairs: the raw text as it is
    abc = out[1]["text"]  # few-shot: a's text and pairs, then b's, then c's raw text
    assert (
        abc.index("Text of a.") < abc.index("Question 1 about a?") < abc.index("Text of b.") < abc.index("Text of c.")
    )
    assert abc.endswith("Text of c.")
    assert stats["pairs_in"] == stats["pairs"] == 10 and stats["texts_without_pairs"] == 1


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


def test_formats_vary_and_are_deterministic() -> None:
    names = {draw_format(rng_for(f"doc:{i}", 7)).name for i in range(1000)}
    assert len(names) >= 20
    pairs = [{"Q": "Why?", "A": "Because."}, {"Q": "What?\nOptions:\n- x\n- y", "A": "y"}]
    one = [render_entry("T.", pairs, draw_format(r := rng_for("k", 1)), r) for _ in range(2)]
    assert one[0] == one[1]
    other = {render_entry("T.", pairs, draw_format(r := rng_for("k", s)), r)[0] for s in range(30)}
    assert len(other) > 10


def test_options_keep_the_right_answer_after_shuffling() -> None:
    q = "Which city is the capital?\nOptions:\n- Lyon\n- Paris\n- Nice\n- Lille"
    seen_positions = set()
    for seed in range(200):
        rng = rng_for(str(seed), 0)
        fmt = draw_format(rng)
        r = render_pair(q, "Paris", fmt, rng)
        assert r.kind == "multiple_choice" and r.options is not None
        assert sorted(o for _, o in r.options) == ["Lille", "Lyon", "Nice", "Paris"]
        label, text = r.options[r.correct]
        assert text == "Paris"
        seen_positions.add(r.correct)
        assert r.question.startswith("Which city is the capital?\n")
        assert all(f"{p}{o}" in r.question for p, o in r.options)
        if fmt.option_labels == "bullet" or fmt.mc_answer == "text":
            assert r.answer == "Paris"
        elif fmt.mc_answer == "label":
            assert r.answer == label.strip().strip("().")
        else:
            assert r.answer == f"{label.strip()} Paris"
        if r.answer != "Paris":  # the label the answer names is the one shown before "Paris"
            shown = {p.strip().strip("().") for p, _ in r.options}
            named = r.answer.split()[0].strip("().")
            assert named in shown and named == label.strip().strip("().")
    assert seen_positions == {0, 1, 2, 3}  # shuffled, not always in place


def test_option_label_styles_and_inline_options() -> None:
    for style in OPTION_LABELS:
        fmt = dataclasses.replace(draw_format(random.Random(0)), option_labels=style)
        r = render_pair("Pick?\nOptions:\n- one\n- two\n- three", "two", fmt, random.Random(3))
        assert r.options[r.correct][1] == "two"
    assert split_options("Is it?\nOptions: - yes - no") == ("Is it?", ["yes", "no"])
    assert split_options("Is it?\nOptions:\nA. yes\nB. no") == ("Is it?", ["yes", "no"])
    assert split_options("Choices: are hard\nsometimes") == ("Choices: are hard\nsometimes", [])


def test_unanswerable_becomes_a_none_option() -> None:
    for seed in range(50):
        rng = rng_for(str(seed), 1)
        r = render_pair("Is the sky green?\nOptions:\n- yes\n- no", "None of the above.", draw_format(rng), rng)
        assert r.kind == "multiple_choice" and len(r.options) == 3
        assert r.correct == 2 and r.options[2][1] in NONE_OPTIONS
    # an option that already says so is used, not duplicated
    r = render_pair("Green?\nOptions:\n- yes\n- not enough information", "Unanswerable", draw_format(rng), rng)
    assert len(r.options) == 2 and r.options[r.correct][1] == "not enough information"
    # an answer that is neither an option nor unanswerable: the question stays open, as written
    r = render_pair("Green?\nOptions:\n- yes\n- no", "purple", draw_format(rng), rng)
    assert r.kind == "open" and r.options is None and r.answer == "purple" and r.question.endswith("- no")


def test_rationale_answers_are_restyled() -> None:
    assert split_rationale("Let's think step by step. Two and two. So the answer is 4.") == ("Two and two.", "4")
    assert split_rationale("The answer is 4.") is None
    rng = rng_for("x", 0)
    fmt = draw_format(rng)
    r = render_pair("Sum?\nOptions:\n- 3\n- 4", "Two and two make four, so the answer is 4", fmt, rng)
    assert r.kind == "multiple_choice_cot" and r.options[r.correct][1] == "4"
    assert "Two and two make four." in r.answer


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
    templify.run(cfg(), run)
    out = outputs(run, 2)
    raw_ids = [r["id"] for k in range(2) for r in read_records(run / "raw" / shard_name(k, 2))]
    covered = Counter(d for o in out for d in o["docs"])
    assert sorted(covered) == sorted(raw_ids) and set(covered.values()) == {1}  # nothing lost, nothing twice
    for o in out:
        assert (o["group"] == "raw") == (not converted(o["id"], 0.6)), o["id"]
    synth = [r for k in range(2) for r in read_records(run / "synth" / shard_name(k, 2))]
    questions = [p["Q"].split("\n")[0] for r in synth for p in r["pairs"]]
    text = "\n".join(o["text"] for o in out)
    assert all(text.count(q) == 1 for q in questions)
    assert sum(o["pairs"] for o in out) == len(questions) > 50
    manifest = read_json(run / "augmented" / "manifest.json")
    t = manifest["totals"]
    assert t["pairs"] == t["pairs_in"] == len(questions)
    assert t["raw_texts"] == sum(o["group"] == "raw" for o in out) > 0
    assert set(t["pair_kinds"]) == {"multiple_choice", "multiple_choice_cot", "cot", "open"}
    for chart in manifest["charts"]:
        assert (run / "augmented" / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(manifest["charts"]) == ["formats.png", "pairs_per_text.png"]


def test_reruns_are_byte_identical_and_seed_changes_formats(tmp_path: Path) -> None:
    runs = [make_synth(make_raw(tmp_path / name, 1, docs=60), 1) for name in ("one", "two")]
    for run in runs:
        templify.run(cfg(), run)
    files = [(run / "augmented" / shard_name(0, 1)).read_bytes() for run in runs]
    assert files[0] == files[1]
    templify.run(cfg(**{"templify.seed": 5}), runs[1], force=True)
    assert (runs[1] / "augmented" / shard_name(0, 1)).read_bytes() != files[0]


def test_interrupted_templify_resumes_to_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = make_synth(make_raw(tmp_path / "ref", 1, docs=80), 1)
    templify.run(cfg(), ref)
    want = (ref / "augmented" / shard_name(0, 1)).read_bytes()
    run = make_synth(make_raw(tmp_path / "run", 1, docs=80), 1)
    prepare(templify.stage_run(cfg(), run))
    out = run / "augmented" / shard_name(0, 1)
    w = RecordWriter(out)
    w.write_many(list(read_records(ref / "augmented" / shard_name(0, 1)))[:20])
    w.flush()
    w.abandon()
    assert partial_path(out).exists()
    templify.run(cfg(), run)
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
        templify.run(cfg(), run)


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

    from ipt_hpc import tokenize

    tok = train_tokenizer(tmp_path / "tok")
    run = make_synth(make_raw(tmp_path / "run", 2, docs=80), 2, share=0.5)
    templify.run(cfg(), run)
    out = outputs(run, 2)
    for group in ("augmented", "raw"):
        sets = {"tokenize.tokenizer": str(tok), "tokenize.record_group": group, "tokenize.workers": 1}
        result = tokenize.run(cfg(**sets), run)
        merged = result["merged"]
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


def test_the_synthesizers_reasoning_shape_is_recognised() -> None:
    q = "Is it long?\nOptions:\n- yes\n- no\nLet's think step by step."
    for seed in range(40):
        rng = rng_for(str(seed), 3)
        fmt = draw_format(rng)
        r = render_pair(q, "It has 3 words.\nTherefore, the answer is no", fmt, rng)
        assert r.kind == "multiple_choice_cot" and r.options[r.correct][1] == "no"
        assert "It has 3 words." in r.answer and "Let's think step by step.\n" not in r.question


def test_records_settings_reach_the_writers_of_every_stage(tmp_path: Path) -> None:
    from ipt_hpc import synthesize, tokenize
    from ipt_hpc.records import zstd_frames

    sets = {"records.level": 19, "records.frame_bytes": 4096, "records.fsync": False}
    runs = {name: make_synth(make_raw(tmp_path / name, 1, docs=120), 1) for name in ("default", "set")}
    templify.run(cfg(), runs["default"])
    templify.run(cfg(**sets), runs["set"])
    files = {name: run / "augmented" / shard_name(0, 1) for name, run in runs.items()}
    assert list(read_records(files["set"])) == list(read_records(files["default"]))
    frames = {name: zstd_frames(f) for name, f in files.items()}
    assert len(frames["default"]) == 1 < len(frames["set"])  # 1 MiB frames vs 4 KiB frames
    assert all((size or 0) <= 4096 + 4096 for _, _, size in frames["set"][:-1])
    # the other per-shard stages build their StageRun from the same settings
    from tokenizer_fixture import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")
    c = cfg(**sets, **{"synth.model": "m", "tokenize.tokenizer": str(tok)})
    for run in (synthesize.stage_run(c, runs["set"]), tokenize.stage_run(c, runs["set"])[0]):
        assert (run.level, run.frame_bytes, run.fsync) == (19, 4096, False)
