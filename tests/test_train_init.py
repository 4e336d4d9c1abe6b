"""Continual pre-training from a Hugging Face checkpoint (train.init_from_hf) on CPU: a tiny random GQA
LlamaForCausalLM becomes the run's iter_0000000, whose Megatron logits at TP=1 and TP=2 equal the HF model's;
training from it at TP=1 and TP=2 gives the same decreasing losses; a resume never re-imports; exporting
iter_0000000 gives back the original tensors bit for bit; misfits fail with messages naming the key/tensor."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import _env, cli
from test_train import REPO, TINY, events, finish, losses, make_tokens, start, tail

from ipt_hpc.config import load_config
from ipt_hpc.errors import IptError
from ipt_hpc.model.train import hf_init, hf_mapping

pytestmark = pytest.mark.train  # starts training runs: not in make test-fast

HF_VOCAB = 500  # < train.model.vocab_size 512: the import pads 12 rows
ITERS = 8
MODEL = [  # must describe the HF model below
    "train.model.num_layers=2",
    "train.model.hidden_size=32",
    "train.model.ffn_hidden_size=64",
    "train.model.num_attention_heads=4",
    "train.model.num_query_groups=2",
    "train.model.vocab_size=512",
    "train.model.rotary_base=5000",
    "train.model.norm_epsilon=1e-5",
    "train.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    f"train.train_iters={ITERS}",
    "train.lr=0.03",
    "train.min_lr=0.003",
    "train.lr_warmup_iters=0",
    "train.save_interval=null",
    "train.keep_checkpoints=5",
    "train.data.groups={augmented: 1.0}",
]
ATOL = 1e-4


def make_hf(folder: Path, **overrides) -> Path:
    """A random tiny Llama (GQA 4:2, untied, RoPE base 5000) with large weights and non-trivial norms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=HF_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        initializer_range=0.2,  # logits of a few units: a wrong QKV split or RoPE layout moves them visibly
        **{"tie_word_embeddings": False, **overrides},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # ones at init: a swapped norm would not show
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(run: Path, ckpt: Path, tokens: torch.Tensor, tp: int) -> torch.Tensor:
    """Logits of the ranks of a TP layout loading ``ckpt`` (tests/megatron_logits.py, torchrun)."""
    tok_path, out_path = run / "probe.pt", run / f"logits-tp{tp}.pt"
    torch.save(tokens, tok_path)
    script = REPO / "tests" / "megatron_logits.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", str(script)]
    cmd += [str(run), str(ckpt), str(tok_path), str(out_path), str(tp), "1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out_path)


def sets(hf: Path, *extra: str) -> list[str]:
    return [*MODEL, f"train.init_from_hf={hf}", *extra]


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def run_tp1(hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Continual pre-training through ``launch train`` (local executor, TP=1)."""
    run = tmp_path_factory.mktemp("init") / "tp1"
    make_tokens(run)
    args = ["train", "--config", str(TINY), "--run", str(run)]
    for s in sets(hf):
        args += ["--set", s]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def test_iteration_0_logits_equal_hf_logits_at_tp1_and_tp2(hf: Path, run_tp1: Path) -> None:
    ckpt = run_tp1 / "train" / "checkpoints" / "iter_0000000"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["model_only"] and meta["iteration"] == 0 and meta["init_from_hf"] == str(hf.resolve())
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, HF_VOCAB, (2, 32), generator=g)
    theirs = hf_logits(hf, tokens)
    assert theirs.abs().max() > 1  # not a degenerate comparison
    for tp in (1, 2):
        ours = megatron_logits(run_tp1, ckpt, tokens, tp)
        assert ours.shape[-1] == 512
        diff = float((ours[..., :HF_VOCAB] - theirs).abs().max())
        assert diff <= ATOL, (tp, diff)


def test_training_starts_from_the_import_and_learns(run_tp1: Path) -> None:
    start_event = events(run_tp1)[0]
    assert start_event["event"] == "start" and start_event["iteration"] == 0
    assert start_event["init_from"].endswith("iter_0000000")
    loss = losses(run_tp1)
    assert len(loss) == ITERS and np.mean(loss[-2:]) < loss[0] - 0.5, loss
    assert loss[0] > math.log(512) + 0.3, loss  # the HF weights' loss (~7.0), not a fresh init's (~ln 512 = 6.24)
    names = sorted(p.name for p in (run_tp1 / "train" / "checkpoints").iterdir())
    assert names == ["iter_0000000", f"iter_{ITERS:07d}", "latest.json"]


def test_tp2_training_from_the_import_matches_tp1_and_resume_never_reimports(
    tmp_path: Path, hf: Path, run_tp1: Path
) -> None:
    run = tmp_path / "tp2"
    make_tokens(run)
    proc = start(run, 2, *sets(hf, "train.tensor_parallel=2"))
    assert finish(proc) == 0, tail(run)
    np.testing.assert_allclose(losses(run), losses(run_tp1), rtol=0, atol=2e-5)
    # a later attempt resumes from the run's own checkpoint, even with the HF folder gone
    gone = tmp_path / "moved-away"
    proc = start(run, 2, *sets(gone, "train.tensor_parallel=2", f"train.train_iters={ITERS + 2}"))
    assert finish(proc) == 0, tail(run)
    assert [(e["event"], e["iteration"]) for e in events(run) if e["event"] in ("start", "resume")] == [
        ("start", 0),
        ("resume", ITERS),
    ]
    assert len(losses(run)) == ITERS + 2


def test_export_of_iteration_0_gives_back_the_hf_weights_exactly(hf: Path, run_tp1: Path) -> None:
    from safetensors.torch import load_file

    out = run_tp1 / "hf0"
    proc = cli("export", "--checkpoint", str(run_tp1 / "train" / "checkpoints" / "iter_0000000"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, exported = load_file(str(hf / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    for name, t in original.items():
        back = exported[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert back.shape == (512, 32) and not back[HF_VOCAB:].any()  # zero padding rows
            back = back[:HF_VOCAB]
        assert back.dtype == t.dtype and torch.equal(back, t), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["hidden_size"] == 32


def test_the_weight_mapping_round_trips_both_ways() -> None:
    """HF -> Megatron -> HF and Megatron -> HF -> Megatron give back the same tensors (GQA: 4 heads, 2 groups)."""
    cfg = load_config(TINY, [*MODEL, "train.model.vocab_size=512"]).train
    gen = torch.Generator().manual_seed(0)
    hf = {k: torch.randn(shape, generator=gen) for k, shape in hf_mapping.expected_shapes(cfg, 500).items()}
    megatron = hf_mapping.from_hf(hf, cfg)
    assert megatron["embedding.word_embeddings.weight"].shape[0] == 512  # padded to vocab_size
    back = hf_mapping.to_hf(megatron, cfg, vocab_rows=500)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    full = hf_mapping.to_hf(megatron, cfg)  # all 512 rows: Megatron -> HF -> Megatron is exact too
    again = hf_mapping.from_hf(full, cfg)
    assert again.keys() == megatron.keys() and all(torch.equal(again[k], megatron[k]) for k in megatron)
    assert len({t.data_ptr() for t in megatron.values()}) == len(megatron)  # no tensor reused by mistake


def test_misfits_fail_with_clear_errors(tmp_path: Path, hf: Path) -> None:
    cfg = load_config(TINY, sets(hf, "train.model.hidden_size=64")).train
    with pytest.raises(IptError, match=r"train\.model\.hidden_size is 64, the checkpoint has 32"):
        hf_init.check_hf_config(cfg, hf)
    tied = make_hf(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(IptError, match="tie_word_embeddings is true"):
        hf_init.check_hf_config(load_config(TINY, sets(tied)).train, tied)
    cfg = load_config(TINY, sets(hf)).train
    tensors = hf_init.load_hf_tensors(hf)
    bad = {**tensors, "model.layers.1.mlp.up_proj.weight": torch.zeros(65, 32)}
    with pytest.raises(IptError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(65, 32\)"):
        hf_mapping.from_hf(bad, cfg)
    no_head = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    with pytest.raises(IptError, match=r"no lm_head\.weight"):
        hf_mapping.from_hf(no_head, cfg)
    small = load_config(TINY, sets(hf, "train.model.vocab_size=256")).train
    with pytest.raises(IptError, match="vocab_size is 256, below the checkpoint's 500"):
        hf_init.check_hf_config(small, hf)
    # the CLI refuses before starting any rank, naming the key
    run = tmp_path / "run"
    make_tokens(run)
    args = ["train", "--config", str(TINY), "--run", str(run)]
    for s in sets(hf, "train.model.num_query_groups=4"):
        args += ["--set", s]
    proc = cli(*args)
    assert proc.returncode != 0 and "train.model.num_query_groups is 4, the checkpoint has 2" in proc.stderr
    assert not (run / "train" / "checkpoints").exists()


def test_model_config_helper_prints_matching_keys(hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert hf_init.main(["model-config", str(hf)]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["train"]["model"]
    assert model == {
        "num_layers": 2,
        "hidden_size": 32,
        "ffn_hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "vocab_size": 512,
        "rotary_base": 5000,
        "norm_epsilon": 1e-5,
    }
    cfg = load_config(TINY, [f"train.model.{k}={v}" for k, v in model.items()]).train
    hf_init.check_hf_config(cfg, hf)  # fits
