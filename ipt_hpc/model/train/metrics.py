"""Training logs in the run folder (rank 0 only): ``log.jsonl``, TensorBoard events if available, and a
PNG loss curve (``loss.png``) redrawn from the whole JSONL history, so it spans resumed attempts too."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson

from ...charts import pyplot, save


class MetricsLog:
    """Append-only JSON Lines log: ``{"kind": "step", "iteration", "loss", "lr", ...}`` or ``"event"``."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled, self.tb = out, enabled, None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.fh = open(out / "log.jsonl", "ab")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def _write(self, record: dict[str, Any]) -> None:
        self.fh.write(orjson.dumps({"time": round(time.time(), 3), **record}) + b"\n")
        self.fh.flush()

    def step(self, **values: Any) -> None:
        if not self.enabled:
            return
        self._write({"kind": "step", **values})
        if self.tb is not None:
            for key, value in values.items():
                if key != "iteration" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, values["iteration"])
        print(
            f"iter {values['iteration']:>7} | loss {values['loss']:.4f} | lr {values['lr']:.3e} | "
            f"grad norm {values['grad_norm'] or 0:.3f} | {values['tokens_per_s']:,.0f} tok/s"
            + (f" | MFU {values['mfu']:.1%}" if values.get("mfu") is not None else ""),
            flush=True,
        )

    def event(self, name: str, **values: Any) -> None:
        if not self.enabled:
            return
        self._write({"kind": "event", "event": name, **values})
        print(f"train: {name} {values}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        plot_loss(read_steps(self.out / "log.jsonl"), self.out / "loss.png")


def read_steps(path: Path) -> dict[int, dict[str, Any]]:
    """Step records by iteration; a step redone after a resume replaces the earlier record."""
    steps: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            steps[record["iteration"]] = record
    return steps


def plot_loss(steps: dict[int, dict[str, Any]], png: Path) -> bool:
    """Draw the loss curve of :func:`read_steps`' records (needs matplotlib; returns False without it)."""
    plt = pyplot()
    if plt is None:
        return False
    xs = sorted(steps)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(xs, [steps[x]["loss"] for x in xs], lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, png)
    return True
