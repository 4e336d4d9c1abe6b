"""The tokenizer worker processes of ``tokenize`` (kept apart so that spawned workers import little).

Two kinds of task: :func:`_encode` tokenizes texts the main process read (the general path), and
:func:`_encode_range` reads, parses and tokenizes a byte range of whole zstd frames of the shard itself
(the fast path for record files whose frames end at record boundaries): no text crosses a process
boundary and reading runs in parallel with tokenizing. Both apply the same record policies
(:func:`select_texts`), so the two paths give the same bytes.
"""

from __future__ import annotations

import array
import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

_WORKER: dict[str, Any] = {}
# The dataset dtypes as array typecodes: no numpy here, whose import would slow each worker's start.
_ARRAY_CODES = {"uint16": "H", "int32": "i"}
assert array.array("H").itemsize == 2 and array.array("i").itemsize == 4


class LineProblem(Exception):
    """A record that the ``error`` policy rejects: the line (counted from the start of the lines given)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(line, reason)
        self.line, self.reason = line, reason


def new_stats() -> dict[str, int]:
    """The policy counts :func:`select_texts` keeps, all zero."""
    return {"bad": 0, "skipped_empty": 0, "other_group": 0}


def select_texts(
    lines: Iterable[tuple[int, bytes]],
    policy: tuple[str, str | None, str, str],
    stats: dict[str, int],
    quarantine: list[tuple[int, str]],
) -> Iterator[str]:
    """Texts of ``(line number, JSON line)`` pairs after the empty-text and bad-record policies.

    ``policy`` is ``(text_field, record_group, empty_text, on_bad_record)``. Raises :class:`LineProblem`
    where a policy says ``error``; quarantined lines are appended as ``(line, reason)``.
    """
    import orjson

    field, record_group, empty_text, on_bad_record = policy
    for lineno, line in lines:
        problem = None
        try:
            rec = orjson.loads(line)
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                problem = f"text field {field!r} is missing or not a string"
        except orjson.JSONDecodeError as exc:
            problem, text = f"invalid JSON ({exc})", None
        if problem is not None:
            if on_bad_record == "error":
                raise LineProblem(lineno, problem)
            quarantine.append((lineno, problem))
            stats["bad"] += 1
            continue
        if record_group is not None and rec.get("group") != record_group:
            stats["other_group"] += 1
            continue
        if not text:
            if empty_text == "error":
                raise LineProblem(lineno, "empty text (set tokenize.empty_text to skip or keep)")
            if empty_text == "skip":
                stats["skipped_empty"] += 1
                continue
        yield text  # type: ignore[misc]


def _init_worker(preload: str | None = None) -> None:
    """Worker start: one core per process; ``preload`` (a ``tokenizer.json``) is loaded now, while the
    main process still prepares the job, and used if the job's tokenizer has the same bytes."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    if preload:
        try:
            with open(preload, "rb") as fh:
                data = fh.read()
            _WORKER["preloaded"] = (hashlib.sha256(data).hexdigest(), Tokenizer.from_str(data.decode()))
        except Exception:  # noqa: BLE001 - only a hint: the job's own file is loaded then
            _WORKER.pop("preloaded", None)


def _setup(spec: tuple[str, str, int | None, int | None, str]) -> dict[str, Any]:
    """The worker's tokenizer for ``spec`` = ``(tokenizer.json, its sha256, bos, eod, dtype)``, loaded once."""
    if _WORKER.get("spec") != spec:
        from tokenizers import Tokenizer

        tok_json, sha, bos, eod, dtype = spec
        sha_pre, tok = _WORKER.pop("preloaded", (None, None))
        if sha_pre != sha:
            tok = Tokenizer.from_file(tok_json)
        _WORKER.clear()
        _WORKER.update(spec=spec, tok=tok, bos=bos, eod=eod, code=_ARRAY_CODES[dtype])
    return _WORKER


def _encode(spec: tuple[str, str, int | None, int | None, str], texts: list[str]) -> tuple[bytes, bytes]:
    """Token ids of a batch, concatenated, and the per-document lengths (as raw bytes, cheap to send)."""
    w = _setup(spec)
    encodings = w["tok"].encode_batch_fast(texts, add_special_tokens=False)
    bos, eod = w["bos"], w["eod"]
    extra = (bos is not None) + (eod is not None)
    ids, lengths = array.array(w["code"]), array.array("i")
    for enc in encodings:  # array copies each id list in C (and refuses an id the dtype cannot hold)
        if bos is not None:
            ids.append(bos)
        ids.fromlist(enc.ids)
        if eod is not None:
            ids.append(eod)
        lengths.append(len(enc) + extra)
    return ids.tobytes(), lengths.tobytes()


def _encode_range(
    spec: tuple[str, str, int | None, int | None, str],
    path: str,
    start: int,
    end: int,
    part: int,
    parts: int,
    last: bool,
    policy: tuple[str, str | None, str, str],
) -> dict[str, Any]:
    """Read bytes ``[start, end)`` of a record file (whole frames), take part ``part`` of ``parts`` of its
    lines, apply the policies and tokenize. Line numbers in the answer count from that part's first line.

    Answers ``{"aligned": False}`` when the frames do not end at a line end or do not decompress (the
    caller then reads the file itself), else the lines taken, the ids and lengths (bytes), the policy
    counts, quarantined ``(line, reason)`` and the first ``error`` ``(line, reason)`` or None.
    """
    import io

    import zstandard

    with open(path, "rb") as fh:
        fh.seek(start)
        raw = fh.read(end - start)
    try:
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True).read()
    except zstandard.ZstdError:
        return {"aligned": False}  # damaged data: the general path reports it with its line
    lines = data.split(b"\n")
    rest = lines.pop()
    if rest:
        if not last:
            return {"aligned": False}
        lines.append(rest)
    n = len(lines)
    if parts > 1:
        lines = lines[part * n // parts : (part + 1) * n // parts]
    stats = new_stats()
    quarantine: list[tuple[int, str]] = []
    out: dict[str, Any] = {"aligned": True, "lines": len(lines), "stats": stats, "quarantine": quarantine}
    try:
        texts = list(select_texts(enumerate(lines, start=1), policy, stats, quarantine))
    except LineProblem as exc:
        return {**out, "error": (exc.line, exc.reason), "ids": b"", "lengths": b""}
    del data, lines
    ids, lengths = _encode(spec, texts) if texts else (b"", b"")
    return {**out, "error": None, "ids": ids, "lengths": lengths}
