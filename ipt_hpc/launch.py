"""Command line: ``python -m ipt_hpc.launch <stage> ...``; the commands live in :mod:`ipt_hpc.cli`."""

from __future__ import annotations

import sys

from .cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
