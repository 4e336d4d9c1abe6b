"""Signals that reach a training rank before its training loop installs its own handlers, and the end of the
rank's helper processes when the rank dies.

Importing torch and Megatron-Core takes seconds; a warning signal (or SIGTERM) in that window would
kill the rank with the signal's default action, and its job would end FAILED instead of being
requeued. ``python -m ipt_hpc.model.train`` calls :func:`install` first thing; :class:`.loop.StopFlag`
then takes over and honours what arrived meanwhile.

This module imports nothing heavy: :func:`die_with_parent` runs first thing in a freshly spawned helper.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h

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


def die_with_parent(parent: int) -> None:
    """Initializer of a rank's long-lived helper process: the kernel SIGKILLs it when the rank dies.

    The helper ignores the stop signals on purpose (``checkpoint.start_writer_helper``), so a rank killed
    outright (SIGKILL, the OOM killer, a node agent) used to leave it running with parent 1, in the run folder,
    and with it multiprocessing's resource tracker, which waits for the helper's end of its pipe.
    ``PR_SET_PDEATHSIG`` (Linux) ties the helper's life to the rank's; elsewhere nothing changes.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the rank died before the line above took effect
        os._exit(0)
