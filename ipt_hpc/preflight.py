"""Preflight: what can be known to fail is found before any job is submitted or worker started.

Checked, each failure one line naming the config key, the path and the fix:

* model and tokenizer folders hold a readable config (hub names: in the local cache, or fetchable
  when online);
* the input stage is complete for the selected shards (:func:`ipt_hpc.execution.submit.launch`
  always checks this, preflight or not);
* the output filesystem has room for the estimated output: input bytes times the stage's output
  ratio (measured on this run's done shards when there are some, else :data:`RATIOS`) times
  :data:`MARGIN`;
* on Slurm: the partition exists and is up, and the time, CPU, memory, GPU and account requests fit
  it (one ``sinfo`` call; :func:`ipt_hpc.execution.backends.slurm_problems`).

Everything is file metadata and small JSON files: about 0.1 s for 10,000 shards
(``tools/bench_preflight.py``). ``--skip-preflight`` skips it (e.g. a model folder that exists only
on the compute nodes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import IptError
from .layout import RunLayout

# Output bytes per input byte of each stage, measured on the demo run (`make demo`, docs/execution.md
# "Preflight"): synthesize 0.72 (half the documents converted), templify 1.52 (it also copies the
# unconverted raw texts), tokenize 1.92 for the shard files plus as much again for the merged group.
# Rounded up; a stage's own done shards replace them as soon as there are some.
RATIOS = {"shard": 1.0, "synthesize": 1.0, "templify": 1.6, "tokenize": 4.0, "decontaminate": 1.0}
MARGIN = 1.5  # room asked for beyond the estimate


@dataclass(frozen=True)
class Problem:
    key: str  # the config key (or flag) at fault
    path: str  # the file, folder or Slurm object it names
    reason: str
    fix: str

    def line(self) -> str:
        return f"{self.key}={self.path}: {self.reason}; {self.fix}"


class PreflightFailed(IptError):
    """One line per problem; nothing was submitted."""

    def __init__(self, what: str, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p.line()}" for p in problems)
        super().__init__(
            f"{what}: preflight found {len(problems)} problem(s); nothing was submitted"
            f" (--skip-preflight submits anyway):\n{lines}"
        )


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_folder(key: str, value: str | None, *, tokenizer_only: bool = False) -> Problem | None:
    """A model (or tokenizer) folder with a config that parses; a hub name that is cached or reachable."""
    if not value:
        return None
    what = "tokenizer" if tokenizer_only else "model"
    path = Path(value)
    if path.exists():
        if not path.is_dir():
            return Problem(key, value, f"is a file, not a {what} folder", f"give the folder that holds the {what}")
        wanted = ["tokenizer_config.json", "tokenizer.json"] if tokenizer_only else ["config.json"]
        found = [path / name for name in wanted if (path / name).is_file()]
        if not found:
            listed = " or ".join(wanted)
            return Problem(key, value, f"has no {listed}: not a Hugging Face {what} folder", f"point {key} at one")
        for file in found:
            try:
                orjson.loads(file.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                return Problem(key, str(file), f"unreadable ({exc})", "repair or replace the file")
        if not tokenizer_only and not _has_weights(path):
            return Problem(key, value, "holds no weights (*.safetensors or pytorch_model*.bin)", "copy them in")
        return None
    if value.startswith((".", "/", "~")) or not _HUB_NAME.match(value):
        return Problem(key, value, "does not exist", f"give an existing {what} folder or a hub name (org/name)")
    return _hub_problem(key, value, "tokenizer_config.json" if tokenizer_only else "config.json")


def _has_weights(path: Path) -> bool:
    patterns = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
    return any(next(path.glob(p), None) is not None for p in patterns)


def _hub_problem(key: str, name: str, filename: str) -> Problem | None:
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, filename), str):
        return None
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    fix = f"download it where there is network (huggingface-cli download {name}) or give a local folder"
    if offline:
        return Problem(key, name, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set", fix)
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(name, filename), timeout=5)  # one request, no retries
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's to read, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Problem(key, name, f"cannot fetch {filename} from the hub ({first})", fix)
    return None


def _free(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def disk_room(key: str, folder: Path, need: int, what: str) -> Problem | None:
    """Room for ``need`` bytes (the margin included) on the filesystem of ``folder``."""
    free = _free(folder)
    if free >= need:
        return None
    return Problem(
        key,
        str(folder),
        f"{what} need(s) about {_human(need)} (estimate x{MARGIN}), the filesystem has {_human(free)} free",
        "free space, or write the run elsewhere (--run)",
    )


def _sizes(paths: Sequence[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def stage_estimate(run: Any, shards: Sequence[int]) -> int:
    """Estimated output bytes of a per-shard stage (:class:`~ipt_hpc.execution.StageRun`) for ``shards``."""
    from .execution import StageState, shard_name

    names = [shard_name(k, run.num_shards) for k in shards]
    in_bytes = _sizes([run.in_dir / n for n in names])
    done = sorted(StageState(run.out_dir).names("done"))[:1000]  # the stage's own ratio, where measurable
    ratio = RATIOS.get(run.stage, 2.0)
    if done:
        out_sizes: dict[str, int] = {}  # one scan of the stage folder: output bytes per shard stem
        with os.scandir(run.out_dir) as entries:
            for e in entries:
                if e.name.startswith("shard-") and e.is_file():
                    stem = e.name.split(".", 1)[0]
                    out_sizes[stem] = out_sizes.get(stem, 0) + e.stat().st_size
        done_in = _sizes([run.in_dir / n for n in done])
        done_out = sum(out_sizes.get(n.split(".", 1)[0], 0) for n in done)
        if done_in:  # a tokenized group's merged .bin copies its shards' once they are all done
            ratio = done_out / done_in * (2 if run.stage == "tokenize" else 1)
    return int(in_bytes * ratio * MARGIN)


def slurm_request(execution: Any) -> list[Problem]:
    from .execution.backends import slurm_problems

    if execution.backend != "slurm":
        return []

    def value(key: str) -> str:
        section, _, name = key.rpartition(".")
        return str(getattr(execution.slurm if section == "execution.slurm" else execution, name, ""))

    return [Problem(key, value(key), reason, fix) for key, reason, fix in slurm_problems(execution)]


def stage_models(cfg: Any, stage: str) -> list[Problem]:
    """The model or tokenizer a stage loads."""
    checks: list[Problem | None] = []
    if stage == "synthesize":
        served = cfg.synth.backend == "server" and not cfg.synth.server.launch
        checks.append(model_folder("synth.model", cfg.synth.model, tokenizer_only=served))  # the server has weights
        if cfg.synth.backend == "server":
            checks.append(server_problem(cfg.synth))
    if stage == "tokenize":
        checks.append(model_folder("tokenize.tokenizer", cfg.tokenize.tokenizer, tokenizer_only=True))
    return [p for p in checks if p]


def server_problem(synth: Any) -> Problem | None:
    """``synth.backend: server``: a running server answers ``/health`` and serves the model (from here: a server
    only the compute nodes reach needs --skip-preflight), or the server module to launch is importable."""
    import importlib.util

    from .stages.synth_launch import served_models

    server = synth.server
    if server.launch:
        try:
            found = importlib.util.find_spec(server.module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return None
        fix = "install vLLM here and on the compute nodes (pip install 'ipt_hpc[vllm]'), or set synth.server.module"
        return Problem("synth.server.module", server.module, "is not importable by this Python", fix)
    if not server.url:
        return Problem("synth.server.url", "", "is not set (backend server)", "set it, or synth.server.launch: true")
    want = server.served_model or synth.model
    try:
        served = served_models(server.url)
    except (OSError, ValueError) as exc:
        fix = "start the server first (docs/synthesis.md), or --skip-preflight if only the compute nodes reach it"
        return Problem("synth.server.url", server.url, f"cannot be reached from here ({exc})", fix)
    if served is None:
        return Problem("synth.server.url", server.url, "/health is not 200", "restart the server")
    if want not in served:
        return Problem(
            "synth.server.url", server.url, f"serves {served}, not {want!r}", "set synth.server.served_model"
        )
    return None


def early(cfg: Any, stage: str) -> None:
    """What a stage command checks before it loads anything: its model or tokenizer, the Slurm request."""
    problems = stage_models(cfg, stage) + slurm_request(cfg.execution)
    if problems:
        raise PreflightFailed(stage, problems)


def stage_checker(cfg: Any) -> Callable[[Any, list[int]], None]:
    """The check :func:`ipt_hpc.execution.submit.launch` runs on the shards it is about to submit: room
    for their output (after :func:`early`; the inputs' completeness is checked by ``launch`` itself)."""

    def check(run: Any, shards: list[int]) -> None:
        room = disk_room("run", run.out_dir, stage_estimate(run, shards), f"{run.stage} of {len(shards)} shard(s)")
        if room:
            raise PreflightFailed(run.stage, [room])

    return check


def pipeline(cfg: Any, run_dir: str | Path, steps: Sequence[Any]) -> None:
    """Everything a whole pipeline needs, before its first job: raises :class:`PreflightFailed`."""
    from .stages.sources import discover_inputs

    run_dir = Path(run_dir)
    problems: list[Problem] = []
    names = [getattr(step, "name", "") for step in steps]
    for stage in ("synthesize", "tokenize"):
        if any(n.startswith(stage) for n in names):
            problems += stage_models(cfg, stage)
    if "train" in names and cfg.train.init_from_hf:
        problems += [p for p in [model_folder("train.init_from_hf", cfg.train.init_from_hf)] if p]
    problems += slurm_request(cfg.execution)
    raw = RunLayout.of(run_dir).raw
    raw_done = (raw / "manifest.json").exists()
    if raw_done:
        corpus = float(_sizes(sorted(raw.glob("shard-*.jsonl.zst"))))
    else:
        try:
            corpus = sum(i.size for i in discover_inputs(cfg.shard.inputs, cfg.shard.format)) * RATIOS["shard"]
        except IptError as exc:
            problems.append(Problem("shard.inputs", ",".join(map(str, cfg.shard.inputs)), str(exc), "fix the paths"))
            corpus = 0.0
    need, size = 0.0 if raw_done else corpus, corpus
    for stage in ("synthesize", "templify", "tokenize"):  # token groups split one stage's records: counted once
        if any(n.startswith(stage) for n in names):
            size *= RATIOS[stage]
            need += size
    room = disk_room("run", run_dir, int(need * MARGIN), "the pipeline's data")
    problems += [room] if room else []
    if problems:
        raise PreflightFailed("pipeline", problems)


def shard(cfg: Any, out: str | Path) -> None:
    """The shard stage's preflight: room for the shards, and the Slurm request."""
    from .stages.sources import discover_inputs

    corpus = sum(i.size for i in discover_inputs(cfg.shard.inputs, cfg.shard.format))
    problems = slurm_request(cfg.execution)
    room = disk_room("--out", Path(out), int(corpus * RATIOS["shard"] * MARGIN), "the shards")
    problems += [room] if room else []
    if problems:
        raise PreflightFailed("shard", problems)
