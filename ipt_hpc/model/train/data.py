"""Training data: Megatron's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` over the tokenize stage's
merged groups (``RUN/tokens/<group>.{bin,idx}``), blended with the configured weights.

The data order is a function of the global sample index only: optimizer step ``it`` consumes samples
``[it * G, (it + 1) * G)`` (G = global batch), and data-parallel rank ``r`` of ``dp`` takes the
``r``-th contiguous slice of them. Resuming needs nothing but the iteration number, and a run resumed
with another data-parallel size sees exactly the same samples per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...atomic import read_json
from ...config import TrainConfig
from ...errors import IptError
from ...layout import RunLayout


@dataclass
class _Tokenizer:
    """The three attributes ``GPTDataset`` reads from a tokenizer (we need no tokenizer to train)."""

    vocab_size: int
    eod: int
    unique_identifiers: dict[str, Any] = field(default_factory=dict)


def group_prefixes(cfg: TrainConfig, run_dir: Path) -> tuple[list[str], list[float], int]:
    """Dataset prefixes, normalised weights and the EOD id of the configured groups; clear errors if missing."""
    prefixes, weights, eods = [], [], set()
    groups = cfg.data.groups
    if cfg.data.mixture:
        report = RunLayout.of(run_dir).mixture
        if not report.exists():
            raise IptError(f"train: train.data.mixture is set but {report} is missing; run: mixture --run {run_dir}")
        groups = {g: row["weight"] for g, row in read_json(report)["groups"].items()}
    for group, weight in groups.items():
        prefix = RunLayout.of(run_dir).token_group(group)
        if not Path(f"{prefix}.idx").exists():
            raise IptError(
                f"train: {prefix}.idx not found; tokenize and merge group {group!r} first"
                f" (python -m ipt_hpc.launch tokenize --run {run_dir} --group {group} ...)"
            )
        manifest = prefix / "manifest.json"
        if manifest.exists():
            eods.add(read_json(manifest).get("config", {}).get("eod_id"))
        prefixes.append(str(prefix))
        weights.append(float(weight))
    eod = cfg.data.eod_id
    if eod is None:
        eods.discard(None)
        if len(eods) != 1:
            raise IptError(f"train: cannot tell the EOD id from the groups' manifests ({eods}); set train.data.eod_id")
        eod = eods.pop()
    total = sum(weights)
    return prefixes, [w / total for w in weights], int(eod)


def build_dataset(cfg: TrainConfig, run_dir: Path, cache_dir: Path) -> Any:
    """The blended training dataset with ``train_iters * global_batch_size`` samples (indices cached)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights, eod = group_prefixes(cfg, run_dir)
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(prefixes, weights) if len(prefixes) > 1 else (prefixes, None),
        split="100,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=_Tokenizer(cfg.model.vocab_size, eod, {"class": "ipt_hpc.model.train", "eod": eod}),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking happens inside attention
    )
    samples = cfg.train_iters * cfg.global_batch_size
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
    if train is None or len(train) < samples:
        raise IptError(f"train: the blend yields {0 if train is None else len(train)} samples, need {samples}")
    return train


def micro_batches(
    dataset: Any, cfg: TrainConfig, iteration: int, dp_rank: int, dp_size: int, device: Any
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of optimizer step ``iteration`` (0-based), in order."""
    G, mbs = cfg.global_batch_size, cfg.micro_batch_size
    per_rank = G // dp_size
    first = iteration * G + dp_rank * per_rank
    for start in range(first, first + per_rank, mbs):
        samples = [dataset[i] for i in range(start, start + mbs)]
        yield {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, non_blocking=True)
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
