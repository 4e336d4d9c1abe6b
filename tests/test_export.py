"""The export stage on CPU: tiny GQA models trained a few steps at TP=1, TP=2 and PP=2 are exported to Hugging
Face folders whose logits equal Megatron-Core's own (computed by the ranks of the saved layout) within float32
tolerance; bf16 / Mistral / sliced vocabulary; a torn export leaves no OUT folder; clear CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, TINY, make_tokens
from tokenizer_fixture import train_tokenizer

from ipt_hpc.atomic import write_json_atomic

pytestmark = pytest.mark.train  # starts training runs: not in make test-fast

MODEL = [  # GQA: 4 query heads share 2 key/value heads, so the fused QKV split is exercised
    "train.model.hidden_size=32",
    "train.model.ffn_hidden_size=64",
    "train.model.num_attention_heads=4",
    "train.model.num_query_groups=2",
    "train.model.vocab_size=512",  # > the tokenizer's ~400 tokens: padded rows
    "train.model.rotary_base=5000",
    "train.model.init_method_std=0.2",  # large weights, large logits: a wrong split or RoPE layout moves them by ~5
    "train.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.train_iters=3",
    "train.lr=0.01",
    "train.save_interval=null",
    "train.data.groups={augmented: 1.0}",
]
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
ATOL = 1e-4  # float32: measured max |diff| ~3e-6 with logits up to ~5


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ipt_hpc.launch", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)


def train_run(root: Path, name: str, tp: int, pp: int, add_bos: bool = True) -> Path:
    """A run trained 3 steps through ``launch train`` (which freezes RUN/train/config.yaml), with a tokenizer
    kept where the tokenize stage keeps it and a manifest saying documents start with BOS."""
    run = root / name
    make_tokens(run)
    train_tokenizer(run / "tokens" / "augmented" / "tokenizer", vocab_size=400, add_bos=add_bos)
    write_json_atomic(run / "tokens" / "augmented" / "manifest.json", {"config": {"eod_id": 1, "bos_id": 0}})
    sets = [*MODEL, f"train.tensor_parallel={tp}", f"train.pipeline_parallel={pp}", f"train.ranks_per_node={tp * pp}"]
    args = ["train", "--config", str(TINY), "--run", str(run)]
    for s in sets:
        args += ["--set", s]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def megatron_logits(run: Path, tokens: torch.Tensor, tp: int, pp: int) -> torch.Tensor:
    """Logits from the ranks of a TP x PP layout loading the run's latest checkpoint (tests/megatron_logits.py)."""
    ckpt = run / "train" / "checkpoints"
    ckpt = ckpt / json.loads((ckpt / "latest.json").read_text())["dir"]
    tok_path, out_path = run / "probe.pt", run / f"logits-tp{tp}-pp{pp}.pt"
    torch.save(tokens, tok_path)
    script = REPO / "tests" / "megatron_logits.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}", str(script)]
    cmd += [str(run), str(ckpt), str(tok_path), str(out_path), str(tp), str(pp)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out_path)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def probe(folder: Path) -> torch.Tensor:
    """Real text through the exported tokenizer (BOS first) and random ids, two rows of 32 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    text = tok("the model of the cluster is a job array of instruction response pairs and data")["input_ids"]
    text = (text * 8)[:32]
    rand = torch.randint(0, len(tok), (32,), generator=torch.Generator().manual_seed(1))
    return torch.stack([torch.tensor(text), rand])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out = {"tp1": train_run(root, "tp1", 1, 1, add_bos=False)}  # a tokenizer that does not add BOS itself
    out["tp2"] = train_run(root, "tp2", 2, 1)
    out["pp2"] = train_run(root, "pp2", 1, 2)
    return out


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_export_logits_equal_megatron_logits_of_the_saved_layout(runs: dict[str, Path], layout: str) -> None:
    run = runs[layout]
    out = run / "hf"
    proc = cli("export", "--checkpoint", str(run / "train" / "checkpoints"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |logit diff|" in proc.stdout
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "export.json"} <= files
    assert not out.with_name("hf.partial").exists()

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["vocab_size"] == 512 and config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] == 32 and config["rope_parameters"]["rope_theta"] == 5000
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    report = json.loads((out / "export.json").read_text())
    tp, pp = LAYOUTS[layout]
    assert report["saved_layout"] == {"tp": tp, "pp": pp, "dp": 1} and report["iteration"] == 3
    assert report["max_abs_logit_diff"] < ATOL and report["tokenizer_adds_bos"] is True

    tokens = probe(out)
    assert tokens[0, 0].item() == 0  # BOS: patched in for tp1, the tokenizer's own for the others
    ours = megatron_logits(run, tokens, tp, pp)
    theirs = hf_logits(out, tokens)
    assert ours.shape == theirs.shape == (2, 32, 512)
    diff = (ours - theirs).abs().max().item()
    print(f"{layout}: max |HF - Megatron(TP={tp}, PP={pp})| = {diff:.3g}, logits up to {ours.abs().max():.3g}")
    assert diff < ATOL
    assert ours.abs().max() > 1  # large enough that a layout mistake could not hide under ATOL


def test_bfloat16_mistral_with_the_vocabulary_sliced_to_the_tokenizer(runs: dict[str, Path]) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    run = runs["tp2"]
    tok_dir = run / "tokens" / "augmented" / "tokenizer"
    out = run / "hf-bf16"
    ckpt = run / "train" / "checkpoints" / "iter_0000003"
    args = ["--dtype", "bfloat16", "--arch", "mistral", "--vocab", "tokenizer", "--tokenizer", str(tok_dir)]
    proc = cli("export", "--checkpoint", str(ckpt), "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["vocab_size"] == n and config["sliding_window"] is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").shape == (n, 32)
    tokens = probe(out)
    ours = megatron_logits(run, tokens, 2, 1)[..., :n]
    theirs = hf_logits(out, tokens)
    assert theirs.shape == (2, 32, n)
    diff = (ours - theirs).abs().max().item()
    print(f"bf16 weights: max |HF - Megatron float32| = {diff:.3g}")
    assert diff < 0.25  # bf16 rounding of the weights; a layout mistake moves logits by ~5
    assert json.loads((out / "export.json").read_text())["max_abs_logit_diff"] < ATOL  # vs bf16-rounded Megatron


TORN = """
import os, signal, sys
import ipt_hpc.model.export as ex
real = ex.write_safetensors
def torn(*args, **kwargs):
    real(*args, **kwargs)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("disk full")
ex.write_safetensors = torn
ex.export(sys.argv[1] + "/train/checkpoints", sys.argv[1] + "/torn")
"""


def test_killed_or_failed_export_leaves_no_output_folder(runs: dict[str, Path]) -> None:
    run = runs["tp1"]
    out = run / "torn"
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    for how in ("kill", "raise"):  # SIGKILL leaves OUT.partial; the next export clears it, then fails cleanly
        proc = subprocess.run([sys.executable, "-c", TORN, str(run), how], env=env, capture_output=True, text=True)
        assert proc.returncode != 0
        assert not out.exists()
        assert out.with_name("torn.partial").exists() == (how == "kill"), proc.stderr[-2000:]


BF16_SAVE = """
import shutil, sys, torch
from pathlib import Path
from ipt_hpc.model import export as ex

def main(src, dst):
    ckpt = ex.find_checkpoint(src)
    target = dst / "train" / "checkpoints" / ckpt.name
    target.mkdir(parents=True)
    shutil.copytree(src / "tokens", dst / "tokens")
    shutil.copy(src / "train" / "config.yaml", dst / "train" / "config.yaml")
    with ex.megatron_process():
        from megatron.core import dist_checkpointing
        model = ex.load_megatron(ckpt, ex.train_config(ckpt)).to(torch.bfloat16)
        dist_checkpointing.save(model.sharded_state_dict(), str(target))
    shutil.copy(ckpt / "meta.json", target / "meta.json")

if __name__ == "__main__":  # dist_checkpointing.save starts a spawn-mode helper
    main(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_bf16_checkpoint_as_saved_on_gpu_exports_its_exact_values(runs: dict[str, Path], tmp_path: Path) -> None:
    """GPU runs save bf16 weights: they load into the float32 TP=1 model exactly (no rounding, no garbage)."""
    from safetensors.torch import load_file

    src, dst = runs["tp1"], tmp_path / "bf16run"
    script = tmp_path / "save_bf16.py"
    script.write_text(BF16_SAVE)
    proc = subprocess.run(
        [sys.executable, str(script), str(src), str(dst)],
        env={**_env(), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in (src, dst):
        if not (run / "hf").exists():
            assert cli("export", "--checkpoint", str(run), "--out", str(run / "hf")).returncode == 0
    report = json.loads((dst / "hf" / "export.json").read_text())
    assert report["checkpoint_dtype"] == "bfloat16" and report["max_abs_logit_diff"] < ATOL
    full, half = load_file(src / "hf" / "model.safetensors"), load_file(dst / "hf" / "model.safetensors")
    assert full.keys() == half.keys()
    for name, tensor in full.items():
        assert torch.equal(half[name], tensor.bfloat16().float()), name


def test_cli_errors_say_what_to_do(runs: dict[str, Path], tmp_path: Path) -> None:
    def error(*args: str) -> str:
        proc = cli("export", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        return proc.stderr

    assert "does not exist" in error("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint" in error("--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    torn = tmp_path / "iter_0000009.tmp"
    torn.mkdir()
    assert "torn or partial" in error("--checkpoint", str(torn), "--out", str(tmp_path / "o"))
    loose = tmp_path / "loose" / "iter_0000003"  # a checkpoint copied out of its run: no frozen config next to it
    shutil.copytree(runs["tp1"] / "train" / "checkpoints" / "iter_0000003", loose)
    assert "--config FILE" in error("--checkpoint", str(loose), "--out", str(tmp_path / "o"))
    wrong = ["--config", str(TINY)]  # hidden 64 in tiny.yaml, 32 in the checkpoint
    assert "pass --config with the config the run was trained with" in error(
        "--checkpoint", str(loose), "--out", str(tmp_path / "o"), *wrong
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    (tmp_path / "o").mkdir()
    assert "--force" in error("--checkpoint", str(runs["tp1"]), "--out", str(tmp_path / "o"))
    plan = cli("export", "--checkpoint", str(runs["tp1"]), "--out", str(tmp_path / "o2"), "--dry-run")
    assert plan.returncode == 0 and "iter_0000003" in plan.stdout and "2 key-value heads" in plan.stdout
    assert "tokens/augmented/tokenizer" in plan.stdout and not (tmp_path / "o2").exists()
    help_text = cli("export", "--help").stdout
    assert "examples:" in help_text and "--checkpoint" in help_text


def test_large_models_are_written_in_shards_with_an_index(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ipt_hpc.model.export import write_safetensors

    tensors = {f"model.layers.{i}.w": torch.randn(64, 64) for i in range(5)}
    names = write_safetensors(tensors, tmp_path, shard_bytes=2 * 64 * 64 * 4 + 1)  # two tensors per file
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4 and set(index["weight_map"].values()) == set(names)
    back = {k: v for name in names for k, v in load_file(str(tmp_path / name)).items()}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    (tmp_path / "one").mkdir()
    assert write_safetensors(tensors, tmp_path / "one") == ["model.safetensors"]
