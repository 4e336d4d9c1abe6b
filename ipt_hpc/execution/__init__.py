"""The execution layer: the only part of ipt_hpc that knows submitit and Slurm.

Stages hand it a task function and items (or, for per-shard stages, a :class:`StageRun`);
it decides where and how they run: ``debug`` (in-process), ``local`` (submitit worker processes)
or ``slurm`` (job arrays, split at MaxArraySize, packed, throttled, checkpointed on preemption).
"""

from .backends import Submission, slurm_available
from .selection import compress_ids, parse_shards
from .shards import ShardContext, StageRun
from .stage import Stage, build, run_stage
from .state import StageState, shard_name
from .submit import launch
from .tasks import PackRunner, TaskFailures, run_tasks

__all__ = [
    "PackRunner",
    "ShardContext",
    "Stage",
    "StageRun",
    "StageState",
    "Submission",
    "TaskFailures",
    "build",
    "compress_ids",
    "launch",
    "parse_shards",
    "run_stage",
    "run_tasks",
    "shard_name",
    "slurm_available",
]
