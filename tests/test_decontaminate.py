"""``decontaminate`` without network: a local lm-eval task with planted overlaps in raw and synthesized shards.

The n-gram core (normalization, the index, the scan, the janitor's excise rule) in-process; the stage through
its real path: the index built from the task through lm-eval's task manager, shards through the execution
layer, each policy's output compared with what it must be, byte for byte."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from ipt_hpc.config import load_config
from ipt_hpc.execution import StageRun, StageState, build, launch, run_stage, shard_name
from ipt_hpc.execution.submit import prepare
from ipt_hpc.records import RecordWriter, partial_path, read_records
from ipt_hpc.stages import decontaminate, templify
from ipt_hpc.stages.decontam_index import build_index
from ipt_hpc.stages.decontam_ngrams import NgramIndex, NgramSettings, Segment, excise, words, words_with_spans

QUESTIONS = [
    "which gas do green plants take in from the air to build sugars during photosynthesis in bright sunlight",
    "name the longest river that flows north through eastern africa and empties into the mediterranean sea",
    "what is the name of the force that keeps the planets of the solar system moving in orbits around the sun",
]
CHOICES = [["oxygen", "carbon dioxide gas", "nitrogen"], ["the amazon", "the nile", "the congo"], ["gravity", "wind"]]
LABELS = [1, 1, 0]
FILLER_A = " ".join(["harbor lanterns swayed over quiet docks while sailors mended nets and traded stories"] * 5)
FILLER_B = " ".join(["the bakery on the corner sold warm rolls to early commuters every single morning"] * 5)

TASK_YAML = """task: planted_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
should_decontaminate: true
doc_to_decontamination_query: question
metric_list:
  - metric: acc
"""


def variant(q: str) -> str:
    """The question with case, punctuation, whitespace and Unicode look-alikes changed (NFKC folds them)."""
    ws = q.split()
    ws[0] = ws[0].upper()
    ws[2] = ws[2] + ","
    ws[5] = "\u201c" + ws[5] + "\u201d"  # curly quotes
    ws[7] = "".join(chr(0xFF00 + ord(c) - 0x20) for c in ws[7])  # full-width letters
    ws[10] = ws[10].replace("fl", "\ufb02") if "fl" in ws[10] else ws[10].title()
    return "  ".join(ws[:4]) + "\n" + "\u00a0".join(ws[4:9]) + " " + " ".join(ws[9:]) + "?!"


RAW = [
    {"id": "exact", "text": f"{FILLER_A} {QUESTIONS[0]}? {FILLER_B}"},
    {"id": "variants", "text": f"{FILLER_B} {variant(QUESTIONS[1])} {FILLER_A}"},
    {"id": "twelve", "text": f"{FILLER_A} {' '.join(QUESTIONS[2].split()[3:15])} {FILLER_B}"},  # 12 words: no hit
    {"id": "clean", "text": f"{FILLER_B} {FILLER_A}"},
    {"id": "answer-only", "text": f"{FILLER_A} carbon dioxide gas {FILLER_B}"},  # 3 words: too short to look for
]


def pair(q: str, a: str) -> dict[str, str]:
    return {"Q": q, "A": a}


SYNTH = [
    {
        "id": "s0",
        "text": FILLER_A,
        "chain": [],
        "pairs": [pair("Where do the sailors work?", "On the docks."), pair(QUESTIONS[0] + "?", "carbon dioxide gas")],
    },
    {"id": "s1", "text": f"{FILLER_B} {QUESTIONS[1]}.", "chain": ["s0"], "pairs": [pair("What is sold?", "Rolls.")]},
    {
        "id": "s2",
        "text": FILLER_B,
        "chain": ["s0", "s1"],  # the last 12 question words, then the gold answer
        "pairs": [pair("Tell me: " + " ".join(QUESTIONS[2].split()[-12:]) + "?", "gravity, as Newton said.")],
    },
    {"id": "s3", "text": FILLER_A, "chain": ["s0", "s1", "s2"], "pairs": [pair("Who mends nets?", "Sailors.")]},
]


def put_records(job: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A shard function that writes the records it is given (makes the raw and synth folders of a test run)."""
    writer = ctx.open_output()
    writer.write_many(job["records"][ctx.shard_id])
    return writer.close().to_json()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("task")
    data = folder / "planted_qa.jsonl"
    rows = [
        {"question": q, "choices": c, "label": label} for q, c, label in zip(QUESTIONS, CHOICES, LABELS, strict=True)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "planted_qa.yaml").write_text(TASK_YAML.format(data=data))
    return folder


def config(task_dir: Path, **sets: Any) -> Any:
    base = {
        "execution.backend": "debug",
        "eval.groups": {"planted": {"tasks": ["planted_qa"]}},
        "eval.include_path": [str(task_dir)],
    }
    return load_config(None, None, {**base, **sets})


def make_run(root: Path, folder: str, records: list[list[dict]]) -> Path:
    job = StageRun("put", str(root), folder, "", len(records), put_records, {"records": records})
    launch(job, "all", config(Path("/nonexistent")).execution)
    return root


def clean(run: Path, task_dir: Path, **sets: Any) -> dict[str, Any]:
    return run_stage(decontaminate.STAGE, config(task_dir, **sets), run)


def log_of(run: Path, folder: str = "raw-clean") -> list[dict]:
    return [json.loads(line) for p in sorted((run / folder / "decontamination").glob("*.jsonl"))
            for line in p.read_text().splitlines()]  # fmt: skip


# -- the n-gram core ------------------------------------------------------------------------------------------
def test_normalization_folds_case_punctuation_whitespace_and_look_alikes() -> None:
    s = NgramSettings()
    assert words(variant(QUESTIONS[1]), s) == QUESTIONS[1].split()
    assert words("Don't — stop!", s) == ["dont", "stop"]  # deleted, as lm-eval's janitor deletes punctuation
    assert words("ＡＢＣ ﬁne\u00a0day", s) == ["abc", "fine", "day"]


def test_the_fast_path_yields_the_words_the_span_path_yields() -> None:
    """words() normalizes the whole text, words_with_spans() each whitespace token: the same words, on texts
    full of what NFKC, lowercasing and the deletions change (combining marks, odd spaces, ligatures)."""
    rng = random.Random(0)
    odd = ["\u00a0", "\u2003", "\u0301", "\u00a8", "\ufb01", "\uff21", "\u0130", "\ufdfa", "\u3000", "\u2028", "\x1c"]
    alphabet = [*"abcXYZ .,'\t\n", *odd, "\u00bd", "\u2460", "é", "ß", "—", "€"]
    s = NgramSettings()
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert words(text, s) == [w for w, _, _ in words_with_spans(text, s)], repr(text)
    assert all(chr(c).isspace() == bool(__import__("re").match(r"\s", chr(c))) for c in range(0x3100))


def small_index(n: int = 13, **kw: Any) -> NgramIndex:
    texts = [(Segment("t", str(i), "question"), q) for i, q in enumerate(QUESTIONS)]
    return NgramIndex.build(NgramSettings(n=n, **kw), texts)


def test_exact_and_altered_questions_are_found_twelve_words_are_not() -> None:
    index = small_index()
    found = index.scan(RAW[0]["text"])
    assert {h.segment.doc for h in found} == {"0"} and len(found) == len(QUESTIONS[0].split()) - 12
    assert {h.segment.doc for h in index.scan(RAW[1]["text"])} == {"1"}
    assert index.scan(RAW[2]["text"]) == []  # a 12-word overlap is not a 13-gram
    assert small_index(n=12).scan(RAW[2]["text"])  # and is one at n=12
    short = NgramIndex.build(NgramSettings(), [(Segment("t", "0", "answer"), "force that keeps the planets going")])
    assert short.segments == [] and short.too_short == 1  # 6 words < min_words: not looked for
    whole = NgramIndex.build(
        NgramSettings(), [(Segment("t", "0", "q"), "force that keeps planets moving around the sun")]
    )
    assert [h.length for h in whole.scan("A force that keeps PLANETS moving around the Sun.")] == [8]  # < n: whole


def test_reference_files_jsonl_and_parquet_are_looked_for_too(tmp_path: Path) -> None:
    """decontaminate.references: benchmarks outside lm-eval, one text per record; the task name is the file's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "private_qa.jsonl").write_text(json.dumps({"id": "q7", "text": QUESTIONS[0]}) + "\n")
    pq.write_table(pa.table({"text": [QUESTIONS[1]]}), tmp_path / "held_out.parquet")
    cfg = load_config(None, None, {
        "decontaminate.tasks": [],
        "decontaminate.references": [str(tmp_path / "private_qa.jsonl"), str(tmp_path / "held_out.parquet")],
    })  # fmt: skip
    manifest = build_index(cfg, tmp_path / "run")
    assert set(manifest["tasks"]) == {"private_qa", "held_out"} and manifest["tasks"]["private_qa"]["documents"] == 1
    assert manifest["tasks"]["held_out"]["fingerprint"].startswith("sha256:")
    from ipt_hpc.stages.decontam_index import load_index

    index, _ = load_index(tmp_path / "run")
    assert {(h.segment.task, h.segment.doc) for h in index.scan(RAW[0]["text"])} == {("private_qa", "q7")}
    assert {(h.segment.task, h.segment.doc) for h in index.scan(RAW[1]["text"])} == {("held_out", "0")}
    bad = load_config(None, None, {"decontaminate.tasks": [], "decontaminate.references": [str(tmp_path / "x.jsonl")]})
    from ipt_hpc.errors import IptError

    with pytest.raises(IptError, match=r"decontaminate.references: .*x.jsonl does not exist"):
        build_index(bad, tmp_path / "run2")


def test_the_index_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    for name in ("a", "b"):
        small_index().save(tmp_path / name)
    for f in ("index.npz", "vocab.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_excise_follows_the_janitor_rule() -> None:
    text = "x" * 1000
    assert excise(text, [(500, 520)]) == ["x" * 300, "x" * 280]
    assert excise(text, [(250, 260)]) == ["x" * 540]  # the 50 characters before it are dropped
    assert excise(text, [(i * 10, i * 10 + 5) for i in range(11)]) is None  # more than 10 matches: the whole text
    assert excise(text, [(i * 10, i * 10 + 5) for i in range(10)]) == ["x" * 705]


def test_no_indexed_ngram_is_left_after_excise_or_drop() -> None:
    """Property: random texts with planted pieces of the questions; after the policy, a scan finds nothing."""
    index = small_index()
    rng = random.Random(1)
    filler = (FILLER_A + " " + FILLER_B).split()
    for trial in range(300):
        parts: list[str] = []
        for _ in range(rng.randint(1, 6)):
            parts += rng.sample(filler, rng.randint(0, 60))
            if rng.random() < 0.6:
                q = QUESTIONS[rng.randrange(3)].split()
                start = rng.randrange(len(q) - 10)
                parts += q[start : start + rng.randint(10, len(q) - start)]
        text = " ".join(parts)
        hits = index.scan(text)
        from ipt_hpc.stages.decontam_ngrams import spans_of

        pieces = excise(text, spans_of(text, hits, index.settings), 30, 40) if hits else [text]
        for piece in pieces or []:
            assert index.scan(piece) == [], (trial, piece)


# -- the stage ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_run(tmp_path_factory: pytest.TempPathFactory, task_dir: Path) -> Path:
    """RUN/raw of 2 shards with the planted records, and the run's index (built through lm-eval)."""
    run = make_run(tmp_path_factory.mktemp("raw") / "run", "raw", [RAW[:3], RAW[3:]])
    manifest = build_index(config(task_dir), run)
    assert manifest["tasks"]["planted_qa"]["documents"] == 3 and manifest["lm_eval_version"]
    assert manifest["ngrams"] > 0 and manifest["settings"]["n"] == 13
    return run


def outputs(run: Path, folder: str, n: int = 2) -> list[dict]:
    return [r for k in range(n) for r in read_records(run / folder / shard_name(k, n))]


def test_flag_writes_the_input_bytes_and_logs_every_hit(raw_run: Path, task_dir: Path) -> None:
    clean(raw_run, task_dir, **{"decontaminate.policy": {"raw": "flag"}, "decontaminate.output_folder": "flagged"})
    for k in range(2):
        name = shard_name(k, 2)
        assert (raw_run / "flagged" / name).read_bytes() == (raw_run / "raw" / name).read_bytes()
    log = log_of(raw_run, "flagged")
    assert {(e["record"], e["doc"], e["action"]) for e in log} == {("exact", "0", "flag"), ("variants", "1", "flag")}
    exact = [e for e in log if e["record"] == "exact"]
    start = len(FILLER_A) + 1
    assert len(exact) == len(QUESTIONS[0].split()) - 12  # one line per 13-gram of the question
    assert exact[0]["span"][0] == start and exact[-1]["span"][1] == start + len(QUESTIONS[0]) + 1  # ... "sunlight?"
    assert exact[0]["ngram"] == " ".join(QUESTIONS[0].split()[:13]) and exact[0]["part"] == "question"
    report = json.loads((raw_run / "flagged" / "manifest.json").read_text())["tasks"]["planted_qa"]
    assert report == {
        "training_records_hit": 2, "removed": 0, "eval_docs_hit": 2, "eval_docs": 3, "eval_docs_hit_share": 0.6667,
        "eval_doc_ids_hit": ["0", "1"],
    }  # fmt: skip


def test_drop_doc_and_excise_outputs_are_exact(raw_run: Path, task_dir: Path) -> None:
    clean(raw_run, task_dir, **{"decontaminate.policy": {"raw": "drop_doc"}, "decontaminate.output_folder": "dropped"})
    assert [r["id"] for r in outputs(raw_run, "dropped")] == ["twelve", "clean", "answer-only"]
    assert [r for r in outputs(raw_run, "dropped")] == [r for r in outputs(raw_run, "raw") if r["id"] in
                                                       ("twelve", "clean", "answer-only")]  # fmt: skip
    clean(raw_run, task_dir)  # the default for raw: excise -> raw-clean
    got = {r["id"]: r["text"] for r in outputs(raw_run, "raw-clean")}
    start = len(FILLER_A) + 1
    end = start + len(QUESTIONS[0]) + 1
    text = RAW[0]["text"]
    assert got["exact"] == text[: start - 200] + "\n\n" + text[end + 200 :]
    assert "variants" in got and QUESTIONS[1].split()[-1] not in got["variants"].lower().split()[-30:-20]
    assert got["twelve"] == RAW[2]["text"] and got["clean"] == RAW[3]["text"]
    totals = json.loads((raw_run / "raw-clean" / "manifest.json").read_text())["totals"]
    assert totals["records_in"] == 5 and totals["records_out"] == 5 and totals["records_excised"] == 2
    assert {e["action"] for e in log_of(raw_run)} == {"excise"}


def test_reruns_are_byte_identical_and_an_interrupted_shard_resumes_to_the_same_bytes(
    raw_run: Path, task_dir: Path
) -> None:
    clean(raw_run, task_dir)  # the default run (done already when the excise test ran first in this process)
    want = {k: (raw_run / "raw-clean" / shard_name(k, 2)).read_bytes() for k in range(2)}
    want_log = log_of(raw_run)
    run_stage(decontaminate.STAGE, config(task_dir), raw_run, force=True)
    assert {k: (raw_run / "raw-clean" / shard_name(k, 2)).read_bytes() for k in range(2)} == want
    # a task killed after its first durable record: the partial output holds one record, no done marker
    cfg = config(task_dir)
    out = raw_run / "raw-clean" / shard_name(0, 2)
    first = list(read_records(out))[:1]
    state = StageState(raw_run / "raw-clean")
    state.clear(out.name)
    out.unlink()
    w = RecordWriter(out)
    w.write_many(first)
    w.flush()
    w.abandon()
    assert partial_path(out).exists() and not out.exists()
    run_stage(decontaminate.STAGE, cfg, raw_run)
    assert out.read_bytes() == want[0] and log_of(raw_run) == want_log
    assert any(e["event"] == "resumed" and e["records"] == 1 for e in state.events(out.name))


def test_drop_pair_on_synthesized_records_and_templify_after_it(tmp_path: Path, task_dir: Path) -> None:
    run = make_run(tmp_path / "run", "synth", [SYNTH])
    cfg = config(task_dir, **{"decontaminate.input_stage": "synth"})
    result = run_stage(decontaminate.STAGE, cfg, run)
    out = {r["id"]: r for r in outputs(run, "synth-clean", 1)}
    assert list(out) == ["s0", "s2", "s3"]  # s1's own text holds question 1: dropped with its pairs
    assert out["s0"]["pairs"] == SYNTH[0]["pairs"][:1]  # the pair that copied question 0 and its answer
    assert out["s2"]["pairs"] == []  # 12 question words + the gold answer: the straddling 13-gram
    assert out["s2"]["chain"] == ["s0"] and out["s3"]["chain"] == ["s0", "s2"]  # s1 left the chains
    assert out["s3"] == SYNTH[3] | {"chain": ["s0", "s2"]}
    log = log_of(run, "synth-clean")
    assert {(e["record"], e["where"], e["doc"], e["action"]) for e in log} == {
        ("s0", "pair:1", "0", "drop_pair"), ("s1", "text", "1", "drop_doc"), ("s2", "pair:0", "2", "drop_pair"),
    }  # fmt: skip
    assert {e["part"] for e in log if e["record"] == "s2"} == {"question+answer"}
    assert result["manifest"]["totals"]["pairs_dropped"] == 2
    tcfg = config(task_dir, **{"templify.input_stage": "synth-clean", "templify.raw_stage": None})
    run_stage(templify.STAGE, tcfg, run)  # the rewritten chains are consistent
    texts = list(read_records(run / "augmented" / shard_name(0, 1)))
    assert sorted(d for t in texts for d in t["docs"]) == ["s0", "s2", "s3"]
    assert all(QUESTIONS[0] not in t["text"].lower() for t in texts)


def test_missing_index_and_missing_policy_are_clear_errors(tmp_path: Path, task_dir: Path) -> None:
    from ipt_hpc.errors import IptError

    run = make_run(tmp_path / "run", "raw", [RAW[:2]])
    cfg = config(task_dir, **{"decontaminate.policy": {"augmented": "drop_pair"}})
    with pytest.raises(IptError, match=r"decontaminate.policy has no entry for group 'raw' \(has: augmented\)"):
        build(decontaminate.STAGE, cfg, run)
    stage = build(decontaminate.STAGE, config(task_dir), run)
    prepare(stage)
    with pytest.raises(IptError):  # the shard task, run without the stage's plan step (as run-shard by hand)
        launch(stage, "all", config(task_dir).execution)
    failed = StageState(run / "raw-clean").read("failed", shard_name(0, 1))
    assert failed and "decontaminate: no index in" in failed["error"], failed


def test_status_the_report_and_the_dataset_card_show_the_hits_per_task(raw_run: Path, task_dir: Path) -> None:
    from conftest import run_cli

    from ipt_hpc.report import build

    clean(raw_run, task_dir, **{"decontaminate.policy": {"raw": "drop_doc"}, "decontaminate.output_folder": "shown"})
    row = ["shown", "raw: drop_doc", "planted_qa", "2", "2", "2 of 3 (66.7%)"]
    status = run_cli("status", "--run", str(raw_run), "--no-queue")
    assert status.returncode == 0 and "decontamination" in status.stdout, status.stderr
    assert re.search(r"shown\s+│ raw: drop_doc\s+│ planted_qa\s+│\s+2 │\s+2 │ 2 of 3 \(66.7%\)", status.stdout)
    report = Path(build(raw_run)["markdown"]).read_text()
    assert "## Decontamination" in report and "| " + " | ".join(row) + " |" in report
    card = publish_card(raw_run)
    assert "## Decontamination" in card and "| " + " | ".join(row) + " |" in card


def test_publish_reads_what_training_read() -> None:
    """With decontaminate.enabled, the published raw and synth parts are the decontaminated folders."""
    from ipt_hpc.layout import RunLayout
    from ipt_hpc.stages.publish import input_folder

    layout = RunLayout.of("/runs/x")
    on = config(Path("/nonexistent"), **{"decontaminate.enabled": True})
    assert [input_folder(on, layout, p).name for p in ("raw", "synth", "augmented")] == [
        "raw-clean", "synth-clean", "augmented",
    ]  # fmt: skip
    off = config(Path("/nonexistent"))
    assert [input_folder(off, layout, p).name for p in ("raw", "synth", "augmented")] == ["raw", "synth", "augmented"]


def publish_card(run: Path) -> str:
    from ipt_hpc.stages.publish_hub import card_text

    return card_text(config(Path("/nonexistent")), run, run / "published", {})


KILL_RECORDS = 120_000  # ~2.5 s of scanning in the task: room to kill it after its first durable records


@pytest.mark.slow
def test_a_sigkilled_shard_resumes_to_identical_bytes(tmp_path: Path, task_dir: Path) -> None:
    """The shard task (``run-shard``, as a Slurm array task runs it) SIGKILLed after its first durable records;
    the rerun resumes after them and ends with the uninterrupted run's bytes and log."""
    from conftest import sigkill_shard_task

    rng = random.Random(3)
    words = (FILLER_A + " " + FILLER_B).split()
    records = []
    for i in range(KILL_RECORDS):
        text = " ".join(rng.choices(words, k=20))
        if i % 97 == 0:
            text += " " + QUESTIONS[i % 3] + ". " + " ".join(rng.choices(words, k=10))
        records.append({"id": f"doc-{i}", "text": text})
    cfg = config(task_dir)
    ref = make_run(tmp_path / "ref", "raw", [records])
    run_stage(decontaminate.STAGE, cfg, ref)
    name = shard_name(0, 1)
    want = (ref / "raw-clean" / name).read_bytes()
    run = make_run(tmp_path / "run", "raw", [records])
    build_index(cfg, run)
    prepare(build(decontaminate.STAGE, cfg, run))
    sigkill_shard_task(run / "raw-clean", name, 1000)
    state = StageState(run / "raw-clean")
    out = run / "raw-clean" / name
    assert not out.exists() and partial_path(out).exists()
    run_stage(decontaminate.STAGE, cfg, run)
    assert out.read_bytes() == want
    assert log_of(run) == log_of(ref) and len(log_of(ref)) > 300
    resumed = next(e for e in state.events(name) if e["event"] == "resumed")
    assert 1000 <= resumed["records"] < KILL_RECORDS
