"""An example per-shard stage: count the words of every raw document (docs/design.md, "Adding a stage")."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ipt_hpc.execution import ShardContext, Stage
from ipt_hpc.records import read_records


class WordCountJob(BaseModel):  # what every shard task gets (hashed into the stage's identity)
    min_length: int = 1


def count_words(job: WordCountJob, ctx: ShardContext) -> dict[str, Any]:
    writer = ctx.open_output()  # resumes after the last durable record of an earlier attempt
    words = 0
    for i, rec in enumerate(read_records(ctx.input_path)):
        n = sum(len(w) >= job.min_length for w in rec["text"].split())
        words += n
        if i >= writer.records:  # records written before a preemption are counted, not written again
            writer.write({"id": rec["id"], "words": n})
    return {**writer.close().to_json(), "words": words}  # numbers are summed over shards in the manifest


STAGE = Stage(
    name="wordcount",
    upstream="the shard stage",
    input=lambda cfg, layout: layout.raw,
    output=lambda cfg, layout: layout.stage("wordcount"),
    shard_fn=count_words,
    job=lambda cfg, layout: WordCountJob(),
)
