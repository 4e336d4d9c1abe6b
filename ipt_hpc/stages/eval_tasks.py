"""lm-eval's tasks for ``eval`` and ``decontaminate``: the task manager (built-in tasks plus custom YAML),
the datasets behind a task or group, loading them before the model (so a dataset missing from an offline
cache stops the run at once), and the message that says how to fetch what is missing."""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EvalConfig
from ..errors import IptError

PACKAGED_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


class DatasetUnavailable(IptError):
    """A task's dataset is neither cached nor downloadable (offline node, or local data files missing)."""


def model_args(cfg: EvalConfig) -> dict[str, Any]:
    """HFLM arguments in the model card's order: pretrained, add_bos_token, dtype, then any extras."""
    if not cfg.model:
        raise IptError("eval: which model? give --model RUN/hf (or set eval.model)")
    for bad in (",", "="):
        if bad in cfg.model:
            raise IptError(f"eval: model path {cfg.model!r} contains {bad!r}, which lm-eval's model_args cannot carry")
    args: dict[str, Any] = {"pretrained": cfg.model, "add_bos_token": cfg.add_bos_token, "dtype": cfg.dtype}
    return args | dict(cfg.model_args)


def task_manager(cfg: EvalConfig) -> Any:
    """lm-eval's TaskManager over its built-in tasks plus ``cfg.include_path`` (custom YAML tasks)."""
    from lm_eval.tasks import TaskManager

    for folder in cfg.include_path:
        if not Path(folder).is_dir():
            raise IptError(f"eval.include_path: {folder} is not a folder of task YAML files")
    include = [str(Path(p).resolve()) for p in cfg.include_path] or None
    metadata = model_args(cfg) if cfg.model else {}
    return TaskManager(include_path=include, metadata=metadata)


@dataclass
class TaskDataset:
    """The Hugging Face dataset a leaf task reads (``dataset_path``, ``dataset_name``, ``dataset_kwargs``)."""

    path: str | None
    name: str | None
    kwargs: dict[str, Any]
    tasks: list[str] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.path in PACKAGED_BUILDERS

    def describe(self) -> str:
        if self.path is None:
            return "(defined in Python; see the task's class)"
        if self.local:
            return f"local {self.path} files {self.kwargs.get('data_files')!r}"
        return repr(self.path) + (f" config {self.name!r}" if self.name else "")

    def load_line(self) -> str:
        args = [repr(self.path)] + ([repr(self.name)] if self.name else [])
        return f'python -c "import datasets; datasets.load_dataset({", ".join(args)})"'


def _leaf_configs(tm: Any, spec: str | dict[str, Any], depth: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
    """(task name, YAML config) of every leaf task under a task, group or tag name, read from lm-eval's index."""
    if depth > 20:
        return
    if isinstance(spec, dict):
        if "group" in spec:
            for child in _as_list(spec.get("task")):
                yield from _leaf_configs(tm, child, depth + 1)
        elif "task" in spec:
            base = tm.task_index.get(spec["task"])
            yield spec["task"], {**((base.cfg or {}) if base is not None else {}), **spec}
        return
    entry = tm.task_index.get(spec)
    if entry is None:
        yield spec, {}
        return
    kind = entry.kind.name
    if kind == "GROUP":
        for child in _as_list((entry.cfg or {}).get("task")):
            yield from _leaf_configs(tm, child, depth + 1)
    elif kind == "TAG":
        for name in sorted(entry.tags):
            yield from _leaf_configs(tm, name, depth + 1)
    else:
        yield entry.name, dict(entry.cfg or {})


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def task_datasets(tm: Any, specs: Iterable[str]) -> list[TaskDataset]:
    """The datasets behind ``specs`` (task, group or tag names), one entry per (path, name)."""
    found: dict[tuple[Any, Any], TaskDataset] = {}
    for spec in specs:
        for task, cfg in _leaf_configs(tm, spec):
            key = (cfg.get("dataset_path"), cfg.get("dataset_name"))
            ds = found.setdefault(key, TaskDataset(key[0], key[1], dict(cfg.get("dataset_kwargs") or {})))
            ds.tasks.append(task)
    return list(found.values())


def check_task_names(tm: Any, specs: Iterable[str]) -> None:
    """Unknown task names are an error naming close matches (and where custom tasks come from)."""
    for spec in specs:
        if spec in tm.task_index or Path(spec).is_file():
            continue
        close = difflib.get_close_matches(spec, tm.all_tasks, n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise IptError(f"eval: {spec!r} is not an lm-eval task, group or tag{hint} (custom tasks: --include-path DIR)")


def _top_level(loaded: dict[str, Any]) -> list[Any]:
    """The Group and Task objects of one ``TaskManager.load`` result that no loaded group contains."""
    children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
    groups = [g for name, g in (loaded.get("groups") or {}).items() if name not in children]
    return groups + [t for name, t in loaded["tasks"].items() if name not in children]


def load_tasks(tm: Any, specs: Sequence[str], *, cfg: EvalConfig | None = None) -> dict[str, list[Any]]:
    """Build every task of ``specs`` (this reads its dataset: from the HF cache offline) before any model loads.

    Returns spec -> the lm-eval Task/Group objects to hand to ``simple_evaluate``. Every spec whose dataset is
    unavailable is collected into one :class:`DatasetUnavailable` naming the datasets and how to fetch them.
    """
    check_task_names(tm, specs)
    built: dict[str, list[Any]] = {}
    failed: list[tuple[str, OSError]] = []
    for spec in dict.fromkeys(specs):
        try:
            built[spec] = _top_level(tm.load([spec]))
        except OSError as exc:  # ConnectionError: offline or no network; FileNotFoundError: local files missing
            failed.append((spec, exc))
    if failed:
        raise DatasetUnavailable(offline_message(tm, failed, cfg))
    return built


def offline_message(tm: Any, failed: list[tuple[str, OSError]], cfg: EvalConfig | None) -> str:
    """What is missing and how to get it: the prefetch command and a ``datasets.load_dataset`` line per dataset."""
    import datasets

    cache = datasets.config.HF_DATASETS_CACHE
    offline = datasets.config.HF_HUB_OFFLINE
    network = any(isinstance(exc, ConnectionError) for _, exc in failed)
    mode = "offline mode: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" if offline else "no network?"
    lines = [
        f"eval: the data of {len(failed)} task(s) could not be loaded"
        + (f" ({mode}; datasets cache: {cache})" if network else "")
        + ":"
    ]
    hub: list[TaskDataset] = []
    for spec, exc in failed:
        refs = task_datasets(tm, [spec])
        for ds in refs[:3]:
            more = f" and {len(ds.tasks) - 1} more task(s)" if len(ds.tasks) > 1 else ""
            lines.append(f"  {spec}: needs dataset {ds.describe()} (task {ds.tasks[0]}{more})")
        if len(refs) > 3:
            lines.append(f"  {spec}: ... and {len(refs) - 3} more dataset(s)")
        lines.append(f"    error: {exc}")
        hub += [ds for ds in refs if not ds.local and ds.path]
    local = [spec for spec, exc in failed if not isinstance(exc, ConnectionError)]
    if local:
        lines.append(f"Check the data_files of the custom task(s) {', '.join(local)} (paths must exist on this node).")
    if hub:
        names = ",".join(spec for spec, _ in failed)
        inc = "".join(f" --include-path {shlex.quote(p)}" for p in (cfg.include_path if cfg else []))
        env = f"HF_HOME={shlex.quote(os.environ['HF_HOME'])} " if "HF_HOME" in os.environ else ""
        lines.append(
            "Download them on a node with network into the cache the evaluation reads (the same HF_HOME or"
            " HF_DATASETS_CACHE, e.g. on a shared file system), then rerun with HF_DATASETS_OFFLINE=1:"
        )
        lines.append(f"  {env}python -m ipt_hpc.launch eval --prefetch --tasks {names}{inc}")
        lines.append("or by hand, one line per dataset (lm-eval loads exactly these):")
        shown = hub[:4]
        lines += [f"  {env}{ds.load_line()}" for ds in shown]
        if len(hub) > len(shown):
            lines.append(f"  ... {len(hub) - len(shown)} more (--prefetch fetches them all)")
    return "\n".join(lines)
