"""Signals that reach a training rank before its training loop installs its own handlers.

Importing torch and Megatron-Core takes seconds; a warning signal (or SIGTERM) in that window would
kill the rank with the signal's default action, and its job would end FAILED instead of being
requeued. ``python -m ipt_hpc.model.train`` calls :func:`install` first thing; :class:`.loop.StopFlag`
then takes over and honours what arrived meanwhile.
"""

from __future__ import annotations

import signal
from typing import Any

NAMES = ("SIGUSR1", "SIGUSR2", "SIGTERM")
received: list[str] = []


def _keep(signum: int, frame: Any) -> None:
    received.append(signal.Signals(signum).name)


def install() -> None:
    for name in NAMES:
        signal.signal(getattr(signal, name), _keep)


def first(names: list[str]) -> str | None:
    """The first early signal among ``names`` (``SIGUSR1`` or ``USR1``), if one arrived."""
    wanted = {f"SIG{n.upper().removeprefix('SIG')}" for n in names}
    return next((n for n in received if n in wanted), None)
