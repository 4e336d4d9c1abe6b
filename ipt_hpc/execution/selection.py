"""Shard selection: ``--shards 0-9999``, ``3,17,40-59``, ``all``, ``missing``, ``failed``."""

from __future__ import annotations

import re
from collections.abc import Collection

from ..errors import IptError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
HELP = "e.g. 0-9999, 3,17,40-59, all, missing (no completion marker) or failed"


def parse_shards(spec: str, total: int, *, done: Collection[int] = (), failed: Collection[int] = ()) -> list[int]:
    """The sorted shard ids that ``spec`` selects out of ``range(total)``."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(total))
    if text == "missing":
        done_set = set(done)
        return [k for k in range(total) if k not in done_set]
    if text == "failed":
        done_set = set(done)
        return sorted(k for k in set(failed) if k not in done_set)
    chosen: set[int] = set()
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise IptError(f"--shards {spec!r}: cannot read {part.strip()!r}; {HELP}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise IptError(f"--shards {spec!r}: range {part.strip()!r} runs backwards")
        if hi >= total:
            raise IptError(f"--shards {spec!r}: shard {hi} is out of range (this stage has shards 0-{total - 1})")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def compress_ids(ids: list[int]) -> str:
    """The inverse of :func:`parse_shards` for a sorted list: ``[0,1,2,5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = None
    for k in ids:
        if prev is not None and k == prev + 1:
            prev = k
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = k
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)
