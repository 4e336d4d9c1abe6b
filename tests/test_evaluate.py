"""The ``eval`` stage: lm-eval's ``simple_evaluate`` end to end on a tiny local Llama with a local task,
BOS reaching the model, result files, the offline error naming the dataset, and the model card's groups."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from tiny_model import tiny_llama
from tokenizer_fixture import train_tokenizer

from ipt_hpc.config import EvalConfig, load_config
from ipt_hpc.errors import IptError
from ipt_hpc.model import evaluate
from ipt_hpc.stages import eval_tasks

# The two commands of the InstructLM model card (instruction-pretrain/InstructLM-500M and -1.3B), verbatim
# after `accelerate launch -m`, with MODEL and add_bos_token substituted.
MODEL_CARD = [
    "lm_eval --model hf --model_args pretrained=${MODEL},add_bos_token=${add_bos_token},dtype=float16"
    " --gen_kwargs do_sample=False --tasks piqa,hellaswag,winogrande --batch_size auto --num_fewshot 0",
    "lm_eval --model hf --model_args pretrained=${MODEL},add_bos_token=${add_bos_token},dtype=float16"
    " --gen_kwargs do_sample=False --tasks social_iqa,ai2_arc,openbookqa,boolq,mmlu --batch_size auto --num_fewshot 5",
]
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
validation_split: validation
fewshot_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def card_commands(model: str) -> list[str]:
    return [c.replace("${MODEL}", model).replace("${add_bos_token}", "True") for c in MODEL_CARD]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose tokenizer does NOT add BOS by itself: BOS can only come from add_bos_token=True."""
    folder = tmp_path_factory.mktemp("hf")
    tiny_llama(folder)
    train_tokenizer(folder, vocab_size=400, add_bos=False)  # same training data: same vocabulary as the model's
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A custom multiple-choice task: YAML + a JSON Lines file of 36 questions, as on an air-gapped cluster."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = ["node", "shard", "token", "model", "array", "job", "record", "corpus", "cluster"]
    with open(folder / "tiny_mc.jsonl", "w", encoding="utf-8") as fh:
        for i in range(36):
            choices = rng.sample(words, 3)
            fh.write(
                json.dumps({"question": f"which {i} is the {rng.choice(words)}", "choices": choices, "label": i % 3})
            )
            fh.write("\n")
    (folder / "tiny_mc.yaml").write_text(
        TASK_YAML.format(data=folder / "tiny_mc.jsonl", cache=folder / "hf-cache"), encoding="utf-8"
    )
    return folder


def eval_config(model: Path, tasks: Path, **extra: object) -> EvalConfig:
    return EvalConfig.model_validate(
        {
            "model": str(model),
            "groups": {"custom": {"tasks": ["tiny_mc"], "num_fewshot": 2}},
            "dtype": "float32",
            "device": "cpu",
            "include_path": [str(tasks)],
            **extra,
        }
    )


@pytest.fixture
def model_inputs(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Every token row lm-eval's real HFLM sends to the model (a spy around HFLM._model_call)."""
    from lm_eval.models.huggingface import HFLM

    rows: list[list[int]] = []
    original = HFLM._model_call

    def spy(self, inps, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.extend(inps.tolist())
        return original(self, inps, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", spy)
    return rows


def test_defaults_are_the_model_card_groups() -> None:
    cfg = EvalConfig(model="RUN/hf")
    plans = evaluate.plan(cfg)
    assert [(p.name, list(p.tasks), p.num_fewshot) for p in plans] == [
        ("zero_shot", ["piqa", "hellaswag", "winogrande"], 0),
        ("five_shot", ["social_iqa", "ai2_arc", "openbookqa", "boolq", "mmlu"], 5),
    ]
    assert [p.lm_eval_command(cfg) for p in plans] == card_commands("RUN/hf")
    assert plans[0].model_args == {"pretrained": "RUN/hf", "add_bos_token": True, "dtype": "float16"}
    assert [p.name for p in evaluate.plan(cfg, ["five_shot"])] == ["five_shot"]
    with pytest.raises(IptError, match="unknown group"):
        evaluate.plan(cfg, ["three_shot"])
    with pytest.raises(IptError, match="batch_size"):
        evaluate.plan(EvalConfig(model="m", batch_size="big"))


def test_dry_run_prints_the_model_card_commands_and_the_slurm_job(tmp_path: Path) -> None:
    proc = run_cli("eval", "--model", "RUN/hf", "--run", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stderr.splitlines()]
    assert "group zero_shot: piqa, hellaswag, winogrande (num_fewshot 0)" in lines
    assert "group five_shot: social_iqa, ai2_arc, openbookqa, boolq, mmlu (num_fewshot 5)" in lines
    for command in card_commands("RUN/hf"):
        assert command in lines
    proc = run_cli(
        "eval", "--model", "RUN/hf", "--run", str(tmp_path), "--executor", "slurm", "--partition", "gpu", "--dry-run"
    )
    assert proc.returncode == 0, proc.stderr
    assert "partition gpu, gpus_per_node 1" in proc.stderr
    assert not (tmp_path / "eval").exists()  # a dry run writes nothing


def test_config_file_eval_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  model: runs/x/hf\n  groups:\n    mine: {tasks: [piqa], num_fewshot: 1}\n")
    cfg = load_config(path, ["eval.dtype=bfloat16"])
    assert cfg.eval.groups["mine"].tasks == ["piqa"] and cfg.eval.dtype == "bfloat16"
    path.write_text("eval:\n  groups:\n    mine: {tasks: []}\n")
    with pytest.raises(IptError, match=r"eval\.groups\.mine\.tasks"):
        load_config(path)


def test_a_decontaminated_run_scores_each_task_on_its_clean_subset_too(
    model_dir: Path, task_dir: Path, tmp_path: Path
) -> None:
    """eval writes RUN/eval of a run whose decontaminate step found documents 0-9 of tiny_mc in its training
    texts: each metric also over the other 26 documents, equal to the mean of lm-eval's own per-document
    scores there; results.md and the report set both side by side; the contaminated set is part of the
    fingerprint (a changed set evaluates again)."""
    from ipt_hpc.report import evaluation_blocks

    run = tmp_path / "run"
    hit = [str(i) for i in range(10)]
    (run / "raw-clean").mkdir(parents=True)
    manifest = {"stage": "decontaminate", "tasks": {"tiny_mc": {"eval_doc_ids_hit": hit, "eval_docs": 36}}}
    (run / "raw-clean" / "manifest.json").write_text(json.dumps(manifest))
    out = run / "eval"
    assert evaluate.run(eval_config(model_dir, task_dir, log_samples=True), out)["ran"] == ["custom"]
    res = json.loads((out / "custom.json").read_text(encoding="utf-8"))
    clean = res["ipt_hpc"]["clean"]["tiny_mc"]
    assert (clean["docs"], clean["contaminated_docs"], clean["clean_docs"]) == (36, 10, 26)
    samples = json.loads((out / "custom.samples.json").read_text(encoding="utf-8"))["tiny_mc"]
    kept = [r for r in samples if str(r["doc_id"]) not in hit]
    assert clean["acc_norm_clean"] == pytest.approx(sum(r["acc_norm"] for r in kept) / 26)
    assert clean["acc_norm"] == pytest.approx(res["results"]["tiny_mc"]["acc_norm,none"])  # all docs: lm-eval's own
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| ours | ours, clean subset | eval docs in training |" in table
    assert f"| {100 * clean['acc_norm_clean']:.1f} | 10 of 36 |" in table
    rows = evaluation_blocks(run)[1][2]
    assert ["custom", "tiny_mc", "acc_norm", f"{100 * clean['acc_norm']:.1f}", f"{100 * clean['acc_norm_clean']:.1f}",
            "10 of 36"] in rows  # fmt: skip
    manifest["tasks"]["tiny_mc"]["eval_doc_ids_hit"] = hit[:5]
    (run / "raw-clean" / "manifest.json").write_text(json.dumps(manifest))
    assert evaluate.run(eval_config(model_dir, task_dir, log_samples=True), out)["ran"] == ["custom"]


@pytest.mark.slow
def test_simple_evaluate_end_to_end_bos_reaches_the_model(
    model_dir: Path, task_dir: Path, tmp_path: Path, model_inputs: list[list[int]]
) -> None:
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(str(model_dir)).bos_token_id
    assert AutoTokenizer.from_pretrained(str(model_dir)).encode("x")[0] != bos  # BOS is not the tokenizer's default
    out = tmp_path / "eval"
    result = evaluate.run(eval_config(model_dir, task_dir), out)
    assert result["ran"] == ["custom"]

    # add_bos_token=True reached the model: every row of every forward pass starts with BOS
    requests = [row for row in model_inputs if set(row) != {1}]  # batch_size auto first probes with all-ones rows
    assert 36 <= len(requests) <= 36 * 3  # 3 choices per question; a shared single-token prefix is run once
    assert {row[0] for row in requests} == {bos}

    res = json.loads((out / "custom.json").read_text(encoding="utf-8"))
    assert 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert res["results"]["tiny_mc"]["sample_len"] == 36
    assert res["n-shot"]["tiny_mc"] == 2
    assert res["config"]["model_args"] == {"pretrained": str(model_dir), "add_bos_token": True, "dtype": "float32"}
    assert res["ipt_hpc"]["group"] == "custom"
    assert "samples" not in res
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["groups"]["custom"]["file"] == "custom.json"
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| Benchmark | lm-eval task | n-shot | metric | ours | Vanilla PT 500M | InstructLM-500M |" in table
    score = 100 * res["results"]["tiny_mc"]["acc_norm,none"]
    assert f"| tiny_mc | tiny_mc | 2 | acc_norm | {score:.1f} ± " in table
    assert "| MMLU | mmlu |" in table
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files left behind

    # a rerun finds the group done and loads nothing
    model_inputs.clear()
    assert evaluate.run(eval_config(model_dir, task_dir), out)["ran"] == []
    assert model_inputs == []


@pytest.mark.slow
def test_without_add_bos_token_the_spy_sees_no_bos(
    model_dir: Path, task_dir: Path, tmp_path: Path, model_inputs: list[list[int]]
) -> None:
    """Control for the test above: the spy would notice a missing BOS."""
    cfg = eval_config(model_dir, task_dir, add_bos_token=False, limit=4)
    evaluate.run(cfg, tmp_path / "eval")
    requests = [row for row in model_inputs if set(row) != {1}]
    assert len(requests) >= 4 and all(row[0] != 0 for row in requests)
    table = (tmp_path / "eval" / "results.md").read_text(encoding="utf-8")
    assert "Not comparable with the paper" in table


def test_tokenizer_without_bos_is_refused(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    train_tokenizer(tmp_path, vocab_size=300, add_bos=False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.bos_token = None
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(IptError, match="has no BOS token"):
        evaluate.check_bos(str(tmp_path))


@pytest.mark.slow
def test_offline_missing_dataset_is_named_before_the_model_loads(model_dir: Path, tmp_path: Path) -> None:
    import lm_eval
    import yaml

    piqa = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml").read_text())
    dataset = piqa["dataset_path"]  # baber/piqa in lm-eval 0.4.13
    empty = tmp_path / "hf-home"
    empty.mkdir()
    env = {**os.environ, "HF_HOME": str(empty), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    args = ["--out", str(tmp_path / "eval"), "--dtype", "float32"]
    proc = subprocess.run(
        [sys.executable, "-m", "ipt_hpc.launch", "eval", "--model", str(model_dir), "--tasks", "piqa", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert f"piqa: needs dataset '{dataset}'" in err
    assert f"datasets.load_dataset('{dataset}')" in err
    assert "python -m ipt_hpc.launch eval --prefetch --tasks piqa" in err
    assert f"HF_HOME={empty}" in err and "HF_DATASETS_OFFLINE" in err
    assert "Traceback" not in err
    assert "Loading weights" not in err  # it failed before the model was loaded
    assert not (tmp_path / "eval" / "piqa.json").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "ipt_hpc.launch", "eval", "--prefetch", "--tasks", "piqa"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "unset HF_DATASETS_OFFLINE" in proc.stderr


def test_task_datasets_of_groups_and_tags(task_dir: Path, tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    yaml_text = (task_dir / "tiny_mc.yaml").read_text(encoding="utf-8")
    (tmp_path / "gone.yaml").write_text(
        yaml_text.replace("task: tiny_mc", "task: gone_mc").replace(
            str(task_dir / "tiny_mc.jsonl"), "/nonexistent.jsonl"
        )
    )
    tm = TaskManager(include_path=str(tmp_path))
    arc = {(d.path, d.name) for d in eval_tasks.task_datasets(tm, ["ai2_arc"])}
    assert arc == {("allenai/ai2_arc", "ARC-Easy"), ("allenai/ai2_arc", "ARC-Challenge")}
    mmlu = eval_tasks.task_datasets(tm, ["mmlu"])
    assert {d.path for d in mmlu} == {"cais/mmlu"} and len(mmlu) == 57
    with pytest.raises(IptError, match=r"did you mean.*hellaswag"):
        eval_tasks.check_task_names(tm, ["hellaswg"])
    with pytest.raises(eval_tasks.DatasetUnavailable) as err:
        eval_tasks.load_tasks(tm, ["gone_mc"])
    assert "gone_mc: needs dataset local json files" in str(err.value) and "/nonexistent.jsonl" in str(err.value)
    assert "Check the data_files of the custom task(s) gone_mc" in str(err.value)


def test_table_tags_groups_and_paper_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """results.md from lm-eval's layout (ai2_arc -> arc_easy, the mmlu group's aggregate) and a filled paper file."""
    from ipt_hpc.atomic import write_json_atomic

    res = {
        "results": {
            "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.45, "acc_norm_stderr,none": 0.01},
            "mmlu": {"acc,none": 0.25, "acc_stderr,none": 0.003, "alias": "mmlu"},
            "mmlu_anatomy": {"acc,none": 0.2, "acc_stderr,none": 0.03},
        },
        "n-shot": {"arc_easy": 5, "mmlu_anatomy": 5},
        "config": {},
        "ipt_hpc": {"tasks": ["ai2_arc", "mmlu"], "num_fewshot": 5},
    }
    (tmp_path / "five_shot.json").write_text(json.dumps(res))
    write_json_atomic(tmp_path / "manifest.json", {"groups": {"five_shot": {"file": "five_shot.json", "model": "m"}}})
    paper = evaluate.paper_results()
    assert all(v is None for b in paper["benchmarks"] for v in b["scores"].values())  # never invented
    arc = next(b for b in paper["benchmarks"] if b["task"] == "arc_easy")
    arc["metric"], arc["scores"]["InstructLM-500M"] = "acc", 12.34
    paper["source"] = "test source"
    monkeypatch.setattr(evaluate, "paper_results", lambda: paper)
    table = evaluate.write_table(tmp_path).read_text(encoding="utf-8")
    assert "| ARC-e | arc_easy | 5 | acc | 50.0 ± 1.0 | – | 12.3 | – | – |" in table
    assert "| MMLU | mmlu | 5 | acc | 25.0 ± 0.3 |" in table
    assert "mmlu_anatomy" not in table and "Paper columns: test source." in table
