"""What the commands share: a subcommand's parser, flags declared with the config field they set, the
configuration and execution options, and the preflight switch.

A flag declared with :func:`flag` and ``key="section.field"`` records that mapping on its parser; its help,
unless given, is the field's description in the config model. :func:`load` then reads the config file,
the ``--set`` overrides and every such flag that was given, in one call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_KEYS = "config_keys"  # the namespace attribute holding {dest: (config key, convert)}


def subcommand(
    sub: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose descriptions and examples print as written; ``run`` handles it."""
    p = sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.set_defaults(handler=run)
    return p


def describe(key: str) -> str | None:
    """The description of the config field ``key`` (``section.field``, nested sections dotted)."""
    from pydantic import BaseModel

    from ..config import Config

    model: Any = Config
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), key
    return model.model_fields[name].description


def flag(
    parser: Any,
    *names: str,
    key: str | None = None,
    convert: Callable[[Any], Any] | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """``parser.add_argument``; with ``key``, a given value (``convert``-ed) sets that config field, and
    the help defaults to the field's description. ``parser`` may be an argument group."""
    if key is not None and "help" not in kwargs:
        text = describe(key)
        kwargs["help"] = text.replace("%", "%%") if text else None
    action = parser.add_argument(*names, **kwargs)
    if key is not None:
        keys = parser.get_default(CONFIG_KEYS) or {}
        keys[action.dest] = (key, convert)
        parser.set_defaults(**{CONFIG_KEYS: keys})
    return action


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """{config key: value} of the flags declared with a key that were given on the command line."""
    out = {}
    for dest, (key, convert) in getattr(args, CONFIG_KEYS, {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            out[key] = convert(value) if convert else value
    return out


def load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    """The validated config: ``--config``, then ``--set``, then the flags (and ``extra``, set last)."""
    from ..config import load_config

    return load_config(args.config, args.overrides, {**config_values(args), **(extra or {})})


def config_options(p: Any, config_help: str, set_help: str | None) -> None:
    """``--config FILE`` and the repeatable ``--set KEY=VALUE`` (``p``: a parser or an argument group)."""
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help=set_help)


def common(p: argparse.ArgumentParser) -> None:
    """The configuration and execution options of the stages that run on an executor."""
    g = p.add_argument_group("configuration")
    config_options(
        g,
        "YAML config (see configs/); validated on load",
        "override any config field, e.g. --set records.level=6 (repeatable)",
    )
    e = p.add_argument_group("execution")
    flag(
        e,
        "--executor",
        key="execution.backend",
        choices=["local", "slurm", "debug"],
        help="where tasks run (default: local)",
    )
    flag(e, "--workers", key="execution.workers", type=int, metavar="N")
    flag(e, "--partition", key="execution.slurm.partition", help="Slurm partition (execution.slurm.partition)")
    flag(e, "--shards-per-task", key="execution.shards_per_task", type=int, metavar="K")
    flag(e, "--parallelism", key="execution.parallelism", type=int, metavar="P")
    e.add_argument("--force", action="store_true", help="redo the stage even if its output is complete")
    e.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    e.add_argument(
        "--skip-preflight",
        action="store_true",
        help="submit without checking models, inputs, disk room and the Slurm request first",
    )


def shard_options(p: argparse.ArgumentParser, wait_help: str = "with --executor slurm: wait for the arrays") -> None:
    """``--shards SPEC`` and ``--wait`` of the per-shard stages."""
    p.add_argument("--shards", default="all", metavar="SPEC", help="0-99, 3,17, all, missing, failed")
    p.add_argument("--wait", action="store_true", help=wait_help)


def preflight_check(args: argparse.Namespace, cfg: Any) -> Any:
    """The preflight check a stage's launch runs on its selected shards (None with --skip-preflight)."""
    from .. import preflight

    return None if getattr(args, "skip_preflight", False) else preflight.stage_checker(cfg)


def preflight_early(args: argparse.Namespace, cfg: Any, stage: str) -> None:
    """The model/tokenizer and Slurm checks, before the stage loads anything (not with --skip-preflight)."""
    from .. import preflight

    if not args.skip_preflight:
        preflight.early(cfg, stage)


def run_stage_command(
    args: argparse.Namespace,
    stage: Any,
    describe: Callable[..., list[str]],
    *,
    prepare_dry_run: bool = True,
    follow: bool = True,
) -> tuple[int, dict[str, Any] | None, Path]:
    """A per-shard stage's command: the config, the early preflight and the stage built for the run; with
    --dry-run, prepare the stage folder (for hand-written sbatch arrays; unless ``prepare_dry_run`` is
    false) and print ``describe(run, cfg)``, else :func:`~ipt_hpc.execution.run_stage` on the selected
    shards behind a progress bar, then (``follow``) the ``status`` command to follow it with. Returns the
    exit status, the launch's result (None for a dry run; with the stage's ``manifest`` once the stage is
    complete) and the stage's folder."""
    from ..execution import build, run_stage
    from ..execution.submit import prepare
    from ..layout import RunLayout
    from . import render

    cfg = load(args)
    preflight_early(args, cfg, stage.name)
    if args.dry_run:
        run = build(stage, cfg, args.run)
        if prepare_dry_run:
            prepare(run)
        return render.dry_run(render.console(), describe(run, cfg)), None, run.out_dir
    console = render.console()
    prog, update = render.progress_reporter(console)
    with prog:
        result = run_stage(
            stage,
            cfg,
            args.run,
            args.shards,
            force=args.force,
            wait=args.wait,
            progress=update,
            check=preflight_check(args, cfg),
        )
    manifest = result.pop("manifest", None)
    console.print(result)
    if follow:
        console.print(f"follow with: python -m ipt_hpc.launch status --run {args.run}")
    return 0, {**result, "manifest": manifest}, stage.output(cfg, RunLayout.of(args.run))
