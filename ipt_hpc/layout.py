"""Every path of a run folder, in one place (what submitit's ``JobPaths`` is to a job).

A run folder holds one sub-folder per data stage, the token groups, the training output, the exported
model, the evaluation and the report::

    RUN/raw/  synth/  augmented/         per-shard stages (shard-*.jsonl.zst, manifest.json, _state/)
    RUN/tokens/<group>/  tokens/<group>.bin/.idx   a token group's shards, and its merged dataset
    RUN/mixture.json                     blend weights over the token groups
    RUN/plan.json                        the plan (``plan``): predicted work, hours, disk, wall time
    RUN/train/  (config.yaml, log.jsonl, loss.png, checkpoints/, logs/, slurm/)
    RUN/hf/  eval/  report/
    RUN/_state/                          the run's own bookkeeping (pipeline logs and records)

No other module spells these names: it asks a :class:`RunLayout`, and a stage folder's bookkeeping
(``_state/``) through :func:`state_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE = "_state"  # bookkeeping inside a stage folder or the run folder


def state_dir(folder: str | Path) -> Path:
    """The bookkeeping folder of a stage folder (markers, events, logs) or of the run folder."""
    return Path(folder) / STATE


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunLayout:
        return cls(Path(run_dir))

    def stage(self, folder: str) -> Path:
        """A per-shard stage's folder (``raw``, ``synth``, ``augmented`` or a configured name)."""
        return self.root / folder

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def synth(self) -> Path:
        return self.root / "synth"

    @property
    def augmented(self) -> Path:
        return self.root / "augmented"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    def token_group(self, group: str) -> Path:
        """A token group's stage folder; with ``.bin``/``.idx`` appended, its merged dataset's prefix."""
        return self.tokens / group

    @property
    def plan(self) -> Path:
        """The plan made before submitting (``plan``), compared with what ran by ``status`` and the report."""
        return self.root / "plan.json"

    @property
    def steps_log(self) -> Path:
        """When each pipeline step started and finished (one JSON line per step)."""
        return self.state / "steps.jsonl"

    @property
    def mixture(self) -> Path:
        return self.root / "mixture.json"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.train / "log.jsonl"

    @property
    def train_config(self) -> Path:
        return self.train / "config.yaml"

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunLayout | None:
        """The run that holds ``RUN/train/checkpoints/iter_N``, if the checkpoint lives in that layout."""
        path = Path(checkpoint)
        run = cls(path.parent.parent.parent)
        return run if run.checkpoints == path.parent else None

    @property
    def state(self) -> Path:
        return state_dir(self.root)

    @property
    def pipeline_logs(self) -> Path:
        return self.state / "logs" / "pipeline"
