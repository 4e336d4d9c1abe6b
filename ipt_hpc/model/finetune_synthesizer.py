"""The ``finetune-synthesizer`` stage: teach a causal LM the instruction synthesizer's format.

The paper builds its synthesizer by fine-tuning a LM on context -> instruction-response examples. Here
each example is exactly what ``synthesize`` will later ask of the model (:mod:`ipt_hpc.stages.synth_format`):

* prompt: ``BOS`` + `` <CON> {context} </CON>\\n\\n`` (no loss);
* target: ``<QUE> {q} <ANS> {a} </END>`` joined by ``\\n\\n``, then ``EOS`` (the loss is on these tokens).

Up to ``pack`` examples are concatenated into one sequence, as the paper does and as multi-round
synthesis chains them at inference. From scratch (no ``base``), a byte-level BPE tokenizer is trained on
the data (``<s>``, ``</s>``, ``<pad>`` special; the five tags as ordinary added tokens, so decoding with
``skip_special_tokens`` keeps them) and a small ``LlamaForCausalLM`` is initialised from the seed.
Training is a plain loop (AdamW, warmup + cosine, gradient clipping), deterministic for a seed and a
step count. The model is saved to ``OUT.partial`` and renamed to ``OUT`` once complete, with
``finetune.json``: the command, data checksums, seed, steps, losses and the parse rate measured after
training on held-out contexts through the synthesize stage's transformers engine.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ..atomic import partial_path, publish_folder, write_json_atomic
from ..config import Config, FinetuneSynthConfig
from ..errors import IptError
from ..stages.synth_format import ANS, CON_CLOSE, CON_OPEN, END, QUE, context_text, parse_pairs, render_pairs

TAGS = [CON_OPEN, CON_CLOSE, QUE, ANS, END]


def published_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """Examples from the ``synth`` config of a dataset written by ``publish`` (its folder, or its hub name
    when the network allows; contexts without pairs are left out), or None when ``path`` is neither."""
    from ..stages.publish import published_files

    found = published_files(path, ("synth",))
    if found is not None:
        import pyarrow.parquet as pq

        rows = [r for f in found[1] for r in pq.read_table(f, columns=["id", "context", "pairs"]).to_pylist()]
    elif not os.path.exists(path) and str(path).count("/") == 1:  # ORG/NAME on the hub
        import datasets

        try:
            rows = list(datasets.load_dataset(str(path), "synth", split="train"))
        except (ConnectionError, OSError, ValueError) as exc:
            raise IptError(f"{path}: cannot read the hub dataset's synth config ({exc})") from exc
    else:
        return None
    pairs = [
        [{"Q": p["question"], "A": p["answer"]} for p in r["pairs"] if p["question"] and p["answer"]] for r in rows
    ]
    out = [{"id": r["id"], "context": r["context"], "pairs": ps} for r, ps in zip(rows, pairs, strict=True) if ps]
    if not out:
        raise IptError(f"{path}: its synth config holds no context with pairs")
    return out


def read_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Examples ``{"id", "context", "pairs": [{"Q", "A"}]}`` of a JSON Lines file (checked) or of a published
    dataset's ``synth`` config."""
    published = published_examples(path)
    if published is not None:
        return published
    out = []
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise IptError(f"{path}: cannot read fine-tuning data ({exc.strerror})") from exc
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise IptError(f"{path}:{n}: not valid JSON ({exc})") from None
        ok = isinstance(rec, dict) and isinstance(rec.get("context"), str) and isinstance(rec.get("pairs"), list)
        if not ok or not all(isinstance(p, dict) and p.get("Q") and p.get("A") for p in rec["pairs"]):
            raise IptError(f'{path}:{n}: expected {{"id", "context": str, "pairs": [{{"Q": str, "A": str}}]}}')
        out.append(rec)
    if not out:
        raise IptError(f"{path}: no examples")
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a data file; of a published dataset folder, of the files its upload would send."""
    from ..stages.publish_hub import content_sha256, upload_plan

    if Path(path).is_dir():
        return content_sha256(Path(path), [name for name, _ in upload_plan(path)])
    if not os.path.exists(path):
        return "hub dataset: not recorded"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (no hub), as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def new_model(fc: FinetuneSynthConfig, tok: Any) -> Any:
    """A randomly initialised small Llama (initialised from the current torch seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if fc.hidden_size % fc.num_heads or fc.num_heads % fc.num_kv_heads:
        raise IptError("finetune_synth: hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=fc.hidden_size,
        intermediate_size=fc.intermediate_size,
        num_hidden_layers=fc.num_layers,
        num_attention_heads=fc.num_heads,
        num_key_value_heads=fc.num_kv_heads,
        max_position_embeddings=fc.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_base(base: str) -> tuple[Any, Any]:
    """A model to fine-tune and its tokenizer; the tags are added as ordinary tokens when missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    except (OSError, ValueError) as exc:
        raise IptError(f"--base {base}: not a loadable causal LM with a fast tokenizer ({exc})") from exc
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise IptError(f"{base}: the tokenizer lacks a BOS or EOS token; the synthesizer protocol needs both")
    if tok.add_tokens([t for t in TAGS if t not in tok.get_vocab()]):
        model.resize_token_embeddings(len(tok))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def encode(tok: Any, rec: dict[str, Any], max_len: int, pieces: Any = None) -> tuple[list[int], list[int]]:
    """``(prompt ids, target ids)`` of one example; the context is cut so that both fit ``max_len``.

    The prompt's context segment is tokenized as the synthesize stage does (one piece after BOS, cut on
    a token edge when over the budget), so the model learns on the ids it will be prompted with.
    """
    from ..stages.synthesize import PieceTokenizer, cut_to_budget

    pieces = pieces or PieceTokenizer(tok)
    target = [*tok.backend_tokenizer.encode(render_pairs(rec["pairs"]), add_special_tokens=False).ids, tok.eos_token_id]
    room = max_len - 1 - len(target)
    overhead = len(pieces.encode([context_text("")])[0])
    if room - overhead < 16:
        raise IptError(f"example {rec.get('id')}: its pairs alone take {len(target)} tokens of {max_len}")
    seg = pieces.encode([context_text(rec["context"])])[0]
    if len(seg) > room:
        seg, _ = cut_to_budget(pieces, rec["context"], room)
    return [tok.bos_token_id, *seg], target


def batches(
    examples: list[tuple[list[int], list[int]]], fc: FinetuneSynthConfig, rng: random.Random, pad: int
) -> list[tuple[Any, Any, Any]]:
    """One epoch: examples shuffled, packed up to ``pack`` per sequence, batched by similar length."""
    import torch

    order = list(range(len(examples)))
    rng.shuffle(order)
    seqs: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    count = 0
    for i in order:
        prompt, target = examples[i]
        if ids and (count == fc.pack or len(ids) + len(prompt) + len(target) > fc.seq_len):
            seqs.append((ids, labels))
            ids, labels, count = [], [], 0
        ids = [*ids, *prompt, *target]
        labels = [*labels, *([-100] * len(prompt)), *target]
        count += 1
    if ids:
        seqs.append((ids, labels))
    # sort within windows of 16 batches to limit padding, then shuffle the batches
    window = fc.batch_size * 16
    seqs = [s for k in range(0, len(seqs), window) for s in sorted(seqs[k : k + window], key=lambda s: len(s[0]))]
    out = []
    for k in range(0, len(seqs), fc.batch_size):
        group = seqs[k : k + fc.batch_size]
        width = max(len(s[0]) for s in group)
        x = torch.full((len(group), width), pad, dtype=torch.long)
        y = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, (i_, l_) in enumerate(group):
            x[row, : len(i_)] = torch.tensor(i_)
            y[row, : len(l_)] = torch.tensor(l_)
            mask[row, : len(i_)] = 1
        out.append((x, y, mask))
    rng.shuffle(out)
    return out


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` over ``progress`` in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: Any,
    examples: list[tuple[list[int], list[int]]],
    fc: FinetuneSynthConfig,
    pad: int,
    eos: int,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The training loop: stops after ``fc.steps`` or ``fc.max_minutes``, whichever comes first."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    rng = random.Random(fc.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": fc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=fc.lr,
        betas=(0.9, 0.95),
    )
    budget = fc.max_minutes * 60 if fc.max_minutes else None
    t0 = time.perf_counter()
    step = seen = tokens = 0
    done = False
    losses: list[float] = []
    curve: list[dict[str, Any]] = []
    stopped = "steps"
    model.train()
    progress = Progress(
        TextColumn("[bold]finetune"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    total = fc.steps if fc.steps else budget
    with progress:
        bar = progress.add_task("finetune", total=total, info="")
        while not done:  # epochs
            for x, y, mask in batches(examples, fc, rng, pad):
                elapsed = time.perf_counter() - t0
                if budget and elapsed >= budget:
                    stopped, done = "time budget", True
                if (fc.steps and step >= fc.steps) or done:
                    done = True
                    break
                p = step / fc.steps if fc.steps else elapsed / budget  # type: ignore[operator]
                lr = fc.lr * lr_factor(p, step, fc.warmup_steps, fc.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = model(input_ids=x, attention_mask=mask, labels=y).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), fc.grad_clip)
                opt.step()
                step += 1
                seen += int((y == eos).sum())  # examples: each target ends with EOS
                tokens += int(mask.sum())
                losses.append(loss.item())
                elapsed = time.perf_counter() - t0
                if step % 10 == 0 or step == 1:
                    recent = sum(losses[-10:]) / len(losses[-10:])
                    point = {"step": step, "loss": round(recent, 4), "lr": lr, "seconds": round(elapsed, 1)}
                    curve.append(point)
                    log(point)
                    info = (
                        f"step {step} loss {recent:.3f} {seen / elapsed:.1f} examples/s {tokens / elapsed:,.0f} tok/s"
                    )
                    progress.update(bar, completed=step if fc.steps else min(elapsed, budget or 0), info=info)
    seconds = time.perf_counter() - t0
    if not losses:
        raise IptError("finetune-synthesizer: no training step ran (budget too small?)")
    if curve[-1]["step"] != step:  # the last step, when it was not a logged one
        recent = losses[-10:]
        curve.append(
            {"step": step, "loss": round(sum(recent) / len(recent), 4), "lr": lr, "seconds": round(seconds, 1)}
        )
        log(curve[-1])
    k = min(20, len(losses))
    return {
        "steps": step,
        "stopped_by": stopped,
        "seconds": round(seconds, 1),
        "examples_seen": seen,
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "first_loss": round(sum(losses[:k]) / k, 4),
        "final_loss": round(sum(losses[-k:]) / k, 4),
        "loss_curve": curve,
    }


def measure_parse_rate(
    model_dir: str | os.PathLike[str],
    contexts: list[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """Share of ``contexts`` for which greedy generation gives at least one pair that parses.

    Generation goes through the synthesize stage's transformers engine; pairs are parsed by
    :func:`ipt_hpc.stages.synth_format.parse_pairs`, exactly as the stage does.
    """
    from ..stages.synth_engines import TransformersEngine

    engine = TransformersEngine(
        str(model_dir),
        device="cpu",
        dtype="float32",
        batch_size=batch_size,
        no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty,
    )
    from ..stages.synthesize import PieceTokenizer, context_ids

    tok = engine.tokenizer
    ids, _, _ = context_ids(PieceTokenizer(tok), contexts, engine.max_len - max_new_tokens - 1)  # as synthesize
    prompts = [[tok.bos_token_id, *seg] for seg in ids if seg is not None]
    gens = engine.generate(prompts, max_new_tokens)
    per_doc, dropped, errors = [], Counter(), 0
    for g in gens:
        errors += g.error is not None
        pairs, drop = parse_pairs(g.text) if g.error is None else ([], Counter())
        per_doc.append(len(pairs))
        dropped.update(drop)
    n = len(per_doc)
    return {
        "contexts": n,
        "with_pairs": sum(1 for c in per_doc if c),
        "parse_rate": round(sum(1 for c in per_doc if c) / n, 4) if n else None,
        "pairs": sum(per_doc),
        "dropped": dict(dropped),
        "errors": errors,
        "max_new_tokens": max_new_tokens,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "repetition_penalty": repetition_penalty,
        "samples": [g.text for g in gens[:3]],
    }


def run(cfg: Config, command: str, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, save to ``OUT.partial``, measure the parse rate, write ``finetune.json``, rename to ``OUT``."""
    import torch

    fc = cfg.finetune_synth
    if not fc.data or not fc.out:
        raise IptError("finetune-synthesizer: say what to train on and where to write: --data FILE --out DIR")
    if not fc.steps and not fc.max_minutes:
        raise IptError("finetune-synthesizer: give --steps N or --max-minutes M (or both)")
    out = Path(fc.out)
    partial = partial_path(out)
    if out.exists() and not force:
        raise IptError(f"{out} exists; pass --force to replace it")
    shutil.rmtree(partial, ignore_errors=True)  # a killed earlier attempt
    torch.set_num_threads(fc.threads or os.cpu_count() or 1)
    torch.manual_seed(fc.seed)
    t0 = time.perf_counter()
    records = read_examples(fc.data)
    heldout = read_examples(fc.heldout) if fc.heldout else []
    if fc.base:
        model, tok = load_base(fc.base)
        max_len = min(fc.seq_len, int(getattr(model.config, "max_position_embeddings", fc.seq_len)))
    else:
        texts = [r["context"] for r in records] + [render_pairs(r["pairs"]) for r in records]
        tok = train_tokenizer(texts, fc.vocab_size)
        model = new_model(fc, tok)
        max_len = min(fc.seq_len, fc.max_positions)
    from ..stages.synthesize import PieceTokenizer

    pieces = PieceTokenizer(tok)
    examples = [encode(tok, r, max_len, pieces) for r in records]
    params = sum(p.numel() for p in model.parameters())
    log(
        f"{len(examples)} examples, {params / 1e6:.2f}M parameters, vocabulary {len(tok)},"
        f" {torch.get_num_threads()} threads"
    )
    partial.mkdir(parents=True)
    with open(partial / "train_log.jsonl", "wb", buffering=0) as fh:  # unbuffered: follow it with tail -f
        result = train(
            model, examples, fc, tok.pad_token_id, tok.eos_token_id, lambda p: fh.write(orjson.dumps(p) + b"\n")
        )
    model.eval()
    model.save_pretrained(str(partial))
    tok.save_pretrained(str(partial))
    evaluation = None
    if heldout and fc.eval_contexts:
        log(f"measuring the parse rate on {min(len(heldout), fc.eval_contexts)} held-out contexts")
        evaluation = measure_parse_rate(
            partial,
            [r["context"] for r in heldout[: fc.eval_contexts]],
            max_new_tokens=fc.eval_max_new_tokens,
            batch_size=fc.eval_batch_size,
            no_repeat_ngram_size=cfg.synth.no_repeat_ngram_size,
            repetition_penalty=cfg.synth.repetition_penalty,
        )
    summary = {
        "command": command,
        "data": {"path": fc.data, "checksum": file_sha256(fc.data), "examples": len(records)},
        "heldout": {"path": fc.heldout, "checksum": file_sha256(fc.heldout), "examples": len(heldout)}
        if fc.heldout
        else None,
        "base": fc.base,
        "seed": fc.seed,
        "parameters": params,
        "vocab_size": len(tok),
        "config": fc.model_dump(),
        **result,
        "eval": evaluation,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    write_json_atomic(partial / "finetune.json", summary)
    publish_folder(partial, out)
    return summary
