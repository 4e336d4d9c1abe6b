"""A small per-shard stage for testing the execution layer: copies records, upper-casing the text.

It is deliberately slow when asked (``delay_s`` per record) so that tests can preempt, requeue or
kill a task in the middle of a shard; ``fail_shards`` makes chosen shards fail on their first
attempt (to test ``--shards failed``). The engine around it is the real one.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ipt_hpc.execution import ShardContext
from ipt_hpc.records import read_records


def slow_upper(cfg: dict[str, Any], ctx: ShardContext) -> dict[str, Any]:
    writer = ctx.open_output()
    done = writer.records
    delay = float(cfg.get("delay_s", 0.0))
    flush_every = int(cfg.get("flush_every", 5))
    fail_now = ctx.shard_id in cfg.get("fail_shards", []) and ctx.attempt == 1
    for i, rec in enumerate(read_records(ctx.input_path)):
        if i < done:
            continue
        if fail_now and i == 2:
            raise RuntimeError(f"deliberate failure of shard {ctx.shard_id}")
        if delay:
            time.sleep(delay)
        writer.write({"id": rec["id"], "text": rec["text"].upper()})
        if (i + 1) % flush_every == 0:
            writer.flush()
            ctx.report(i + 1)
    # what the executor gave the task (test_fanout: the local executor shares the CPUs out as OpenMP threads)
    threads = os.environ.get("OMP_NUM_THREADS")
    return {**writer.close().to_json(), "next_inputs": [p.name for p in ctx.next_inputs], "omp_num_threads": threads}
