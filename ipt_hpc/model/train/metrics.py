"""Training logs in the run folder (rank 0 only): ``log.jsonl``, TensorBoard events if available, and a
PNG loss curve (``loss.png``) redrawn from the whole JSONL history, so it spans resumed attempts too."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ...atomic import atomic_write_bytes, write_json_atomic
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


@contextlib.contextmanager
def step_profiler(enabled: bool, on_gpu: bool, out: Path, iteration: int, write: bool) -> Iterator[None]:
    """``torch.profiler`` around one training step (``train.torch_profile_step``); the writing rank leaves
    ``torch-profile-<N>.txt`` (PyTorch's table, top 30 by self time on the device, or the CPU) and ``.json``
    (the same top kernels as records) in ``out``."""
    if not enabled:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        yield
        if on_gpu:
            torch.cuda.synchronize()
    if not write:
        return
    averages = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=30)
    top = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)[:30]
    total = sum(getattr(e, key, 0) for e in averages) or 1
    records = [
        {
            "name": e.key,
            "self_ms": round(getattr(e, key, 0) / 1000, 3),
            "share": round(getattr(e, key, 0) / total, 4),
            "calls": e.count,
        }
        for e in top
    ]
    atomic_write_bytes(out / f"torch-profile-{iteration}.txt", table.encode())
    write_json_atomic(out / f"torch-profile-{iteration}.json", {"sort_by": key, "top": records})
