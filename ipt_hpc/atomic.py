"""Atomic, durable file writes: temp file + fsync + rename + directory fsync."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike[str]) -> Path:
    """The in-progress name of ``path``: written there, renamed to ``path`` once complete."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of it.

    ``durable=False`` leaves out the two fsyncs (file and folder), for advisory files (a running shard's
    progress) that a node crash may take or leave empty: readers still never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, durable: bool = True) -> None:
    """Atomically write ``obj`` as indented JSON (keys sorted, so equal objects give equal bytes)."""
    data = orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    atomic_write_bytes(path, data, durable=durable)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json_atomic`."""
    with open(path, "rb") as fh:
        return orjson.loads(fh.read())


def publish_folder(partial: Path, out: Path) -> None:
    """Make the folder written as ``partial`` (:func:`partial_path`) appear as ``out``: every file fsynced,
    then one rename (an ``out`` from before is replaced), so ``out`` is never seen half written."""
    import shutil

    for path in sorted(partial.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(partial)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    fsync_dir(out.parent)
