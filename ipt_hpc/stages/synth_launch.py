"""``synth.server.launch``: a task starts its own OpenAI-compatible server (vLLM's, the module: the CPU build's
``vllm serve`` script fails on its distribution's name) and stops it when it is done.

The server listens on a free loopback port, logs to the stage's shard-log folder (``server-<host>-<pid>.log``),
and runs in a session of its own, so stopping it reaches its engine processes too: TERM to the group, then KILL
after a grace period. It also gets TERM if the task process dies without stopping it (``PR_SET_PDEATHSIG``), and
the task stops it at exit; under Slurm a preempted or cancelled step's processes are signalled anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import IptError


class ServerFailed(IptError):
    """The server cannot serve this shard (one line saying why)."""


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later; a lost race is retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_models(url: str, timeout_s: float = 5) -> list[str] | None:
    """The model names a server at ``url`` lists, None when its ``/health`` is not 200; raises ``OSError``
    (unreachable, an HTTP error) or ``ValueError`` (an answer that is not JSON)."""
    url = url.rstrip("/")
    with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
        if resp.status != 200:
            return None
    with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout_s) as resp:
        return [m.get("id") for m in json.load(resp).get("data", [])]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LaunchedServer:
    """One server process of this task: ``python ARGS --host 127.0.0.1 --port P``."""

    def __init__(
        self, args: tuple[str, ...], log_dir: Path, *, python: str = sys.executable, grace_s: float = 30
    ) -> None:
        self.args = args
        self.python = python
        self.grace_s = grace_s
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"server-{socket.gethostname()}-{os.getpid()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.startup_s = 0.0
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        self.port = free_port()
        cmd = [self.python, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} ipt_hpc launches: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(  # preexec_fn only sets the parent-death signal
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        with open(self.log, "ab") as log:
            log.write(f"# server pid {self.proc.pid}\n".encode())

    def start(self, model: str, deadline_s: float) -> float:
        """Start the server and wait until ``/health`` answers 200 and ``/v1/models`` lists ``model``; returns
        the seconds that took. A server that exits or misses the deadline fails the shard with one line."""
        t0 = time.monotonic()
        for _ in range(3):  # another process may take the free port before the server binds it
            self._spawn()
            while time.monotonic() - t0 < deadline_s:
                why = self.exited()
                if why:
                    break
                if self._serves(model):
                    self.startup_s = round(time.monotonic() - t0, 1)
                    return self.startup_s
                time.sleep(0.5)
            else:
                self.stop()
                raise ServerFailed(
                    f"synthesize: the launched server did not answer /health and list {model!r} within"
                    f" {deadline_s:g} s (synth.server.startup_timeout_s); its log: {self.log}"
                )
            if "address already in use" not in self._tail(4000).lower():
                raise ServerFailed(f"synthesize: {why}")
        raise ServerFailed(f"synthesize: {self.exited()}")

    def _serves(self, model: str) -> bool:
        try:
            return model in (served_models(self.url) or [])
        except (OSError, ValueError):
            return False

    def exited(self) -> str | None:
        """Why the server is gone (exit code, log and its last line), None while it runs."""
        code = None if self.proc is None else self.proc.poll()
        if code is None:
            return None
        last = next((line for line in reversed(self._tail(4000).splitlines()) if line.strip()), "")
        return f"the launched server exited with code {code} (log {self.log}; last line: {last.strip()[:300]})"

    def _tail(self, size: int) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """TERM to the server's process group, KILL after ``grace_s``; a no-op once stopped."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        for sig, wait in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 30.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the group: vLLM's engine processes too
            try:
                proc.wait(wait)
                if sig == signal.SIGTERM:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # what of the group outlived its leader
                return
            except subprocess.TimeoutExpired:
                continue
