"""Configuration: validation errors name the file and key; overrides; hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_cli

from ipt_hpc.config import config_hash, load_config
from ipt_hpc.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "shard:\n  num_shard: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: key 'shard.num_shard': unknown key" in str(err.value)


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'sharding': unknown key"):
        load_config(write(tmp_path, "sharding: {}\n"))


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'shard\.num_shards': Input should be a valid integer"):
        load_config(write(tmp_path, "shard:\n  num_shards: many\n"))
    with pytest.raises(ConfigError, match=r"key 'records\.on_bad_record': Input should be 'error' or 'quarantine'"):
        load_config(write(tmp_path, "records:\n  on_bad_record: ignore\n"))
    with pytest.raises(ConfigError, match=r"key 'shard\.num_shards': Input should be greater than or equal to 1"):
        load_config(write(tmp_path, "shard:\n  num_shards: 0\n"))


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "shard: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_values_and_win(tmp_path: Path) -> None:
    path = write(tmp_path, "shard:\n  num_shards: 4\n  text_field: text\n")
    cfg = load_config(path, ["shard.num_shards=64", "shard.keep_fields=[url, ts]", "records.fsync=false"])
    assert cfg.shard.num_shards == 64
    assert cfg.shard.keep_fields == ["url", "ts"]
    assert cfg.records.fsync is False
    assert cfg.shard.text_field == "text"


def test_unquoted_on_off_reach_the_on_off_fields(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare on/off as a bool: the GPU test's ``--set train.distributed_optimizer=on`` failed on
    an H200 with "Input should be 'auto', 'on' or 'off'" before this."""
    path = write(tmp_path, "train:\n  distributed_optimizer: off\n")
    assert load_config(path).train.distributed_optimizer == "off"
    assert load_config(path, ["train.distributed_optimizer=on"]).train.distributed_optimizer == "on"
    with pytest.raises(ConfigError, match=r"train\.distributed_optimizer"):
        load_config(path, ["train.distributed_optimizer=7"])


def test_bad_override_is_attributed_to_set(tmp_path: Path) -> None:
    path = write(tmp_path, "shard:\n  num_shards: 4\n")
    with pytest.raises(ConfigError, match=r"--set: key 'shard\.num_shards': Input should be a valid integer"):
        load_config(path, ["shard.num_shards=lots"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["shard.num_shards"])
    with pytest.raises(ConfigError, match="'num_shards' is not a section"):
        load_config(path, ["shard.num_shards=3", "shard.num_shards.x=1"])


def test_hash_ignores_key_order_and_sees_values() -> None:
    assert config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == config_hash({"b": {"d": 3, "c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_cli_reports_config_error_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "shard:\n  txt_field: content\n")
    proc = run_cli("shard", "--config", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "key 'shard.txt_field': unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
