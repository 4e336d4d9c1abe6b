"""Record I/O: round trip, framing, durability, resume after SIGKILL, corruption reports."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zstandard

import ipt_hpc.records as records_module
from ipt_hpc.errors import IptError, RecordError
from ipt_hpc.records import (
    RecordWriter,
    count_records,
    file_checksum,
    iter_lines,
    partial_path,
    read_records,
)

FRAME = 64 * 1024


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"s:{i}", "text": "".join(rng.choice('abcdefgh é東\n\t"\\') for _ in range(rng.randint(0, 3000)))}
        for i in range(n)
    ]


def write_all(path: Path, recs: list[dict], flush_every: int = 0, **kw) -> bytes:
    with RecordWriter(path, frame_bytes=FRAME, **kw) as w:
        for i, r in enumerate(recs):
            w.write(r)
            if flush_every and i % flush_every == flush_every - 1:
                w.flush()
    return path.read_bytes()


def frame_count(data: bytes) -> int:
    n, pos = 0, 0
    dctx = zstandard.ZstdDecompressor()
    while pos < len(data):
        obj = dctx.decompressobj()
        obj.decompress(data[pos:])
        assert obj.eof
        pos = len(data) - len(obj.unused_data)
        n += 1
    return n


def test_round_trip_and_stats(tmp_path: Path) -> None:
    recs = records(800)
    path = tmp_path / "a.jsonl.zst"
    with RecordWriter(path, frame_bytes=FRAME) as w:
        w.write_many(recs[:400])
        for r in recs[400:]:
            w.write(r)
    assert list(read_records(path)) == recs
    assert count_records(path) == 800
    assert not partial_path(path).exists()
    # several frames, each a valid zstd frame; a standard decoder reads the whole file
    data = path.read_bytes()
    assert frame_count(data) > 5
    text = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    assert text.count(b"\n") == 800


def test_close_returns_manifest_stats(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    w = RecordWriter(path, frame_bytes=FRAME)
    w.write_many(records(300))
    stats = w.close()
    assert stats.records == 300
    assert stats.bytes == path.stat().st_size
    assert stats.checksum == file_checksum(path)
    raw = zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True).read()
    assert stats.raw_bytes == len(raw)


def test_empty_file_is_a_valid_zstd_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl.zst"
    stats = RecordWriter(path).close()
    assert stats.records == 0 and stats.bytes > 0
    assert list(read_records(path)) == []


def test_flush_pattern_does_not_change_bytes(tmp_path: Path) -> None:
    recs = records(500, seed=3)
    a = write_all(tmp_path / "a.jsonl.zst", recs)
    b = write_all(tmp_path / "b.jsonl.zst", recs, flush_every=7)
    c = write_all(tmp_path / "c.jsonl.zst", recs, flush_every=1)
    assert a == b == c


def test_compression_threads_do_not_change_bytes(tmp_path: Path) -> None:
    recs = records(700, seed=12)
    ref = write_all(tmp_path / "ref.jsonl.zst", recs, threads=0)
    assert frame_count(ref) > 10
    for threads in (1, 3):
        for every in (0, 5, 41):
            out = write_all(tmp_path / f"t{threads}-{every}.jsonl.zst", recs, flush_every=every, threads=threads)
            assert out == ref, (threads, every)


def slow_compressors(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02) -> None:
    """Frames take a while on the pool's threads (a busy CPU), so flushes and kills find some in flight."""
    real = records_module._compress

    def compress(level: int, data: bytes) -> bytes:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(seconds)
        return real(level, data)

    monkeypatch.setattr(records_module, "_compress", compress)


def _fsyncs_of(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Calls to os.fsync on ``path`` from now on, each as the file's bytes at that moment (still fsynced for real)."""
    seen: list[bytes] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            seen.append(path.read_bytes())
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_flush_fsyncs_once_sync_s_has_passed_and_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = records(300, seed=13)
    path = tmp_path / "a.jsonl.zst"
    synced = _fsyncs_of(partial_path(path), monkeypatch)
    w = RecordWriter(path, frame_bytes=FRAME, sync_s=3600)
    for i in range(0, 100, 10):
        w.write_many(recs[i : i + 10])
        w.flush()
    assert synced == []  # written to the file (the next test reads it), not fsynced: an hour has not passed
    assert w.flush(sync=True) == 100 and len(synced) == 1
    assert w.flush_if_idle()  # what a preemption signal's handler calls: fsyncs
    assert len(synced) == 2
    w.abandon()
    w = RecordWriter(path, frame_bytes=FRAME, sync_s=0, resume=True)  # resume fsyncs the cut file once
    assert w.records == 100 and len(synced) == 3
    for r in recs[100:110]:
        w.write(r)
        w.flush()
    assert len(synced) == 13  # sync_s=0: every flush
    w.close()
    assert len(synced) == 14
    other = tmp_path / "b.jsonl.zst"
    synced_other = _fsyncs_of(partial_path(other), monkeypatch)
    w = RecordWriter(other, frame_bytes=FRAME, fsync=False)
    w.write_many(recs)
    w.flush(sync=True)
    w.close()
    assert synced_other == []


def test_node_crash_image_at_last_fsync_resumes_to_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node crash keeps what was fsynced: the file as it was at the last fsync resumes to identical bytes."""
    recs = records(900, seed=14)
    ref = write_all(tmp_path / "ref.jsonl.zst", recs)
    path = tmp_path / "a.jsonl.zst"
    synced = _fsyncs_of(partial_path(path), monkeypatch)
    slow_compressors(monkeypatch)
    w = RecordWriter(path, frame_bytes=FRAME, sync_s=3600, threads=2)
    for i, r in enumerate(recs[:700], 1):
        w.write(r)
        if i % 50 == 0:
            w.flush(sync=i == 350)
    w.abandon()
    assert len(synced) == 1
    partial_path(path).write_bytes(synced[0])  # everything written after that fsync lost
    w = RecordWriter(path, frame_bytes=FRAME, resume=True)
    assert w.records == 350
    w.write_many(recs[350:])
    w.close()
    assert path.read_bytes() == ref


def test_partial_file_is_readable_prefix_after_flush(tmp_path: Path) -> None:
    recs = records(200, seed=4)
    path = tmp_path / "a.jsonl.zst"
    w = RecordWriter(path, frame_bytes=FRAME)
    w.write_many(recs[:123])
    assert w.flush() == 123
    w.abandon()
    assert not path.exists()
    data = partial_path(path).read_bytes()
    text = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    assert text.count(b"\n") == 123
    with pytest.raises(IptError, match="unfinished"):
        list(read_records(partial_path(path)))


def test_flush_appends_a_tail_frame_and_leaves_earlier_flushes_alone(tmp_path: Path) -> None:
    recs = records(300, seed=16)
    path = tmp_path / "a.jsonl.zst"
    w = RecordWriter(path, frame_bytes=FRAME, threads=0)
    seen = []
    for i in range(4):
        w.write_many(recs[i * 5 : i * 5 + 5])
        w.flush()
        seen.append(partial_path(path).read_bytes())
    for before, after in itertools.pairwise(seen):
        assert after.startswith(before)  # a kill during a flush cannot take what earlier flushes wrote
    assert frame_count(seen[-1]) == 4
    w.write_many(recs[20:])  # full frames replace the tail frames
    w.flush()
    data = partial_path(path).read_bytes()
    assert not data.startswith(seen[0]) and 2 < frame_count(data) < 20
    w.abandon()
    w = RecordWriter(path, frame_bytes=FRAME, resume=True)
    assert w.records == 300
    w.close()
    assert path.read_bytes() == write_all(tmp_path / "ref.jsonl.zst", recs)


def test_refuses_to_overwrite_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    write_all(path, records(3))
    with pytest.raises(IptError, match="already complete"):
        RecordWriter(path)
    with pytest.raises(IptError, match="already complete"):
        RecordWriter(path, resume=True)


@pytest.mark.parametrize("cut", [0, 1, 57, 199, 200])
def test_resume_after_torn_tail_gives_identical_bytes(tmp_path: Path, cut: int) -> None:
    recs = records(200, seed=5)
    ref = write_all(tmp_path / "ref.jsonl.zst", recs)
    path = tmp_path / "a.jsonl.zst"
    w = RecordWriter(path, frame_bytes=FRAME)
    for i, r in enumerate(recs[:cut]):
        w.write(r)
        if i % 13 == 0:
            w.flush()
    w.flush()
    w.abandon()
    with open(partial_path(path), "ab") as fh:  # a torn frame: header and a few bytes
        fh.write(zstandard.ZstdCompressor().compress(b'{"x": 1}\n' * 100)[:25])
    w = RecordWriter(path, frame_bytes=FRAME, resume=True)
    assert w.records == cut
    assert w.recovered_note is not None
    w.write_many(recs[w.records :])
    w.close()
    assert path.read_bytes() == ref


def test_resume_without_partial_starts_fresh(tmp_path: Path) -> None:
    recs = records(50)
    ref = write_all(tmp_path / "ref.jsonl.zst", recs)
    w = RecordWriter(tmp_path / "a.jsonl.zst", frame_bytes=FRAME, resume=True)
    assert w.records == 0
    w.write_many(recs)
    w.close()
    assert (tmp_path / "a.jsonl.zst").read_bytes() == ref


def start_writer(script: str, path: Path) -> subprocess.Popen[str]:
    """A writer process running ``script`` (a template of the tests folder, path and frame size)."""
    code = script.format(tests=str(Path(__file__).parent), path=str(path), frame=FRAME)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_records import records
    from ipt_hpc.records import RecordWriter
    recs = records(4000, seed=9)
    w = RecordWriter({path!r}, frame_bytes={frame})
    for i, r in enumerate(recs):
        w.write(r)
        if i % 50 == 49:
            w.flush()
        if i == 1500:
            print("half", flush=True)
    print("done", flush=True)
    import time; time.sleep(60)
    """
)


def test_sigkilled_writer_leaves_readable_prefix_and_resumes_to_same_bytes(tmp_path: Path) -> None:
    recs = records(4000, seed=9)
    ref = write_all(tmp_path / "ref.jsonl.zst", recs)
    path = tmp_path / "killed.jsonl.zst"
    proc = start_writer(KILLED_WRITER, path)
    assert proc.stdout.readline().strip() == "half"
    os.kill(proc.pid, signal.SIGKILL)  # mid-write: the writer is still producing records
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = partial_path(path)
    assert partial.exists() and not path.exists()
    # the readable prefix: whole frames decode to whole records that equal the input's first ones
    w = RecordWriter(path, frame_bytes=FRAME, resume=True)
    survived = w.records
    assert 1500 <= survived < 4000
    w.abandon()
    dctx = zstandard.ZstdDecompressor()
    prefix = dctx.decompressobj()
    data = partial.read_bytes()
    lines: list[bytes] = []
    pos = 0
    while pos < len(data):
        obj = dctx.decompressobj()
        try:
            out = obj.decompress(data[pos:])
        except zstandard.ZstdError:
            break
        if not obj.eof:
            break
        lines.extend(out.splitlines())
        pos = len(data) - len(obj.unused_data)
    del prefix
    assert len(lines) == survived
    # continue after the last durable record: identical to the uninterrupted write
    w = RecordWriter(path, frame_bytes=FRAME, resume=True)
    assert w.records == survived
    w.write_many(recs[survived:])
    w.close()
    assert path.read_bytes() == ref


KILLED_BETWEEN_FLUSHES = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_records import records
    from ipt_hpc.records import RecordWriter
    recs = records(3000, seed=15)
    import ipt_hpc.records as records_module
    real = records_module._compress
    records_module._compress = lambda level, data: time.sleep(0.02) or real(level, data)  # pool threads only
    w = RecordWriter({path!r}, frame_bytes={frame}, threads=2, sync_s=3600)
    for i, r in enumerate(recs, 1):
        w.write(r)
        if i % 400 == 0:
            print("flushed", w.flush(), flush=True)
        if i == 1000:  # 200 records after the last flush: frames cut, some still on the pool's threads
            print("between", w.records, flush=True)
            time.sleep(60)
    """
)


def test_kill_between_two_flushes_with_frames_in_flight_resumes_identically(tmp_path: Path) -> None:
    recs = records(3000, seed=15)
    ref = write_all(tmp_path / "ref.jsonl.zst", recs)
    path = tmp_path / "killed.jsonl.zst"
    proc = start_writer(KILLED_BETWEEN_FLUSHES, path)
    assert proc.stdout.readline().split() == ["flushed", "400"]
    assert proc.stdout.readline().split() == ["flushed", "800"]
    assert proc.stdout.readline().split() == ["between", "1000"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    w = RecordWriter(path, frame_bytes=FRAME, resume=True)
    survived = w.records
    assert 800 <= survived <= 1000  # nothing flushed is lost; frames cut since may or may not have landed
    w.write_many(recs[survived:])
    w.close()
    assert path.read_bytes() == ref


def test_corrupt_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    write_all(path, records(300, seed=2))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecordError, match=r"a\.jsonl\.zst:\d+: corrupt or truncated zstd data"):
        list(read_records(path))


def test_truncated_final_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    write_all(path, records(300, seed=2))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RecordError, match="corrupt or truncated"):
        list(read_records(path))


def test_bad_json_line_reported_with_line_number(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"a": 1}\n{"a": 2}\n{oops\n'))
    with pytest.raises(RecordError, match=r"a\.jsonl\.zst:3: invalid JSON"):
        list(read_records(path))
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"a": 1}\n[1, 2]\n'))
    with pytest.raises(RecordError, match=r":2: expected a JSON object, got list"):
        list(read_records(path))


def test_write_line_validates(tmp_path: Path) -> None:
    w = RecordWriter(tmp_path / "a.jsonl.zst")
    with pytest.raises(ValueError):
        w.write_line(b'{"a": 1}')
    with pytest.raises(ValueError):
        w.write_line(b'{"a": 1}\n{"b": 2}\n')
    w.write_line(b'{"a": 1}\n')
    w.close()
    assert [r for _, r in iter_lines(tmp_path / "a.jsonl.zst")] == [b'{"a": 1}']


def test_exception_in_with_block_leaves_partial_not_final(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.zst"
    with pytest.raises(RuntimeError), RecordWriter(path) as w:
        w.write({"a": 1})
        w.flush()
        raise RuntimeError("boom")
    assert not path.exists()
    assert partial_path(path).exists()


def test_default_threads_follow_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert records_module.default_threads() == (0 if cpus < 2 else min(cpus, records_module.MAX_THREADS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a local worker's share of a 2-core machine: compress in place
    assert records_module.default_threads() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert records_module.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert records_module.default_threads() == records_module.MAX_THREADS
