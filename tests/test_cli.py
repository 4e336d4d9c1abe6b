"""The command line package: flags declared with their config field, help from the field's description,
and the eval decisions the CLI asks the stage for (where to write, which Slurm job)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ipt_hpc.cli import build_parser
from ipt_hpc.cli.common import CONFIG_KEYS, config_values, describe
from ipt_hpc.config import EvalConfig, ExecutionConfig
from ipt_hpc.errors import IptError
from ipt_hpc.layout import RunLayout
from ipt_hpc.model import evaluate


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_has_a_handler_and_its_keys_name_config_fields() -> None:
    commands = subparsers()
    assert list(commands)[:3] == ["shard", "synthesize", "finetune-synthesizer"] and len(commands) == 19
    for name, p in commands.items():
        assert callable(p.get_default("handler")), name
        for dest, (key, _) in (p.get_default(CONFIG_KEYS) or {}).items():
            describe(key)  # a KeyError names a flag whose key is not a config field
            assert any(a.dest == dest for a in p._actions), (name, dest)


def test_flags_become_config_values_only_when_given() -> None:
    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--limit", "5", "--executor", "slurm"])
    assert config_values(args) == {"eval.model": "m", "eval.limit": 5, "execution.backend": "slurm"}
    assert isinstance(config_values(args)["eval.limit"], int)
    assert config_values(parser.parse_args(["eval", "--limit", "0.5"])) == {"eval.limit": 0.5}
    assert config_values(parser.parse_args(["shard", "--out", "o"])) == {}
    assert config_values(parser.parse_args(["merge", "--run", "r", "--group", "g"])) == {}


def test_help_without_a_text_of_its_own_is_the_fields_description() -> None:
    text = subparsers()["shard"].format_help()
    assert describe("execution.parallelism") == "at most this many array tasks at once (%P)"
    assert "at most this many array tasks at once (%P)" in text  # a '%' in a description is not a format
    assert describe("records.on_bad_record") in " ".join(text.split())


def test_eval_writes_to_eval_out_then_the_run_then_the_models_run(tmp_path: Path) -> None:
    model = tmp_path / "run" / "hf"
    model.mkdir(parents=True)
    assert evaluate.output_dir(EvalConfig(model=str(model), out="elsewhere")) == Path("elsewhere")
    assert evaluate.output_dir(EvalConfig(model="hub/name"), tmp_path / "r") == RunLayout.of(tmp_path / "r").eval
    assert evaluate.output_dir(EvalConfig(model=str(model))) == RunLayout.of(tmp_path / "run").eval
    with pytest.raises(IptError, match="say where to write"):
        evaluate.output_dir(EvalConfig(model="hub/name"))


def test_an_eval_job_asks_one_gpu_unless_configured() -> None:
    local = ExecutionConfig()
    assert evaluate.job_execution(local) is local
    assert evaluate.job_execution(ExecutionConfig(backend="slurm")).slurm.gpus_per_node == 1
    assert evaluate.job_execution(ExecutionConfig(backend="slurm", slurm={"gpus_per_node": 4})).slurm.gpus_per_node == 4
    assert evaluate.job_execution(ExecutionConfig(backend="slurm", slurm={"gpus_per_node": 0})).slurm.gpus_per_node == 0
