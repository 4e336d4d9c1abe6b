"""The pre-training mixture: which raw texts are converted, and Megatron blend weights over token groups.

* :func:`converted` decides, from a document's id alone, whether it goes to synthesis (the paper converts
  only part of the corpus); the rest flows to the ``raw`` group through ``templify``.
* :func:`blend` turns per-group token counts (from the tokenize manifests) and the config's
  ``mixture.groups`` (``repeat``: epochs over a group; ``share``: a fixed share of the training tokens)
  into the weights megatron-core's ``BlendedMegatronDatasetBuilder`` takes, and a report of token shares.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..atomic import read_json, write_json_atomic
from ..errors import ConfigError, IptError
from ..layout import RunLayout


def converted(doc_id: str, share: float, seed: int = 0) -> bool:
    """Whether a document is sent to synthesis: a stable hash of its id under ``share``."""
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def group_tokens(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Tokens, documents and dataset prefix of every merged group under ``RUN/tokens``."""
    out: dict[str, dict[str, Any]] = {}
    tokens_dir = RunLayout.of(run_dir).tokens
    for manifest in sorted(tokens_dir.glob("*/manifest.json")):
        m = read_json(manifest)
        if m.get("stage") == "tokenize" and "dataset" in m:
            out[m["group"]] = {"tokens": m["tokens"], "documents": m["documents"], "prefix": m["dataset"]}
    return out


def blend(groups: dict[str, Any], tokens: dict[str, dict[str, Any]], train_tokens: int | None = None) -> dict[str, Any]:
    """Blend weights and token shares for ``groups`` (the config's ``mixture.groups``).

    A group with ``share`` gets that fraction of the training tokens; the remaining fraction is split
    among the ``repeat`` groups in proportion to ``tokens x repeat`` (so ``repeat: 4`` sees its data four
    times as often as a ``repeat: 1`` group, per token). Weights sum to 1.
    """
    if not groups:
        raise ConfigError("mixture.groups is empty: name at least one token group")
    missing = [g for g in groups if g not in tokens]
    if missing:
        have = ", ".join(sorted(tokens)) or "none"
        raise IptError(f"mixture: no tokenized group {missing[0]!r} (tokenized groups: {have}); run tokenize first")
    empty = [g for g in groups if tokens[g]["tokens"] == 0]
    if empty:
        raise IptError(f"mixture: group {empty[0]!r} has no tokens")
    fixed = {g: spec.share for g, spec in groups.items() if spec.share is not None}
    scaled = {g: tokens[g]["tokens"] * (spec.repeat or 1.0) for g, spec in groups.items() if spec.share is None}
    rest = 1.0 - sum(fixed.values())
    if rest < -1e-9:
        raise ConfigError(f"mixture: the groups' shares add up to {sum(fixed.values()):.3f} > 1")
    if scaled and rest <= 1e-9:
        raise ConfigError("mixture: fixed shares take all the tokens; groups with 'repeat' would get none")
    if not scaled and abs(rest) > 1e-6:
        raise ConfigError(f"mixture: the groups' shares add up to {1 - rest:.3f}, not 1")
    weights = dict(fixed)
    total_scaled = sum(scaled.values())
    for g, s in scaled.items():
        weights[g] = rest * s / total_scaled
    rows = {}
    for g in groups:
        row = {**tokens[g], "weight": round(weights[g], 6)}
        if train_tokens:
            row["epochs"] = round(weights[g] * train_tokens / tokens[g]["tokens"], 3)
        rows[g] = row
    megatron = []
    for g in groups:
        megatron += [str(round(weights[g], 6)), rows[g]["prefix"]]
    return {"groups": rows, "train_tokens": train_tokens, "data_path": megatron}


def write_report(run_dir: str | Path, groups: dict[str, Any], train_tokens: int | None) -> dict[str, Any]:
    """Compute the blend for a run's tokenized groups and keep it as ``RUN/mixture.json``."""
    report = blend(groups, group_tokens(run_dir), train_tokens)
    write_json_atomic(RunLayout.of(run_dir).mixture, report)
    return report
