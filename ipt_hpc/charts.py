"""PNG charts for manifests, training logs and the run report: matplotlib (headless), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import fsync_dir, partial_path


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the headless Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig: Any, path: Path) -> str:
    """Write ``fig`` as ``path`` (temp + fsync + rename), close it, and return the file name."""
    import matplotlib.pyplot as plt

    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
    plt.close(fig)
    return path.name
