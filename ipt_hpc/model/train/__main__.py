"""``python -m ipt_hpc.model.train``: one training rank (torchrun and srun start one per device)."""

import sys

from . import early

# dist_checkpointing starts a spawn-mode helper process, which re-imports the main module: guard it.
if __name__ == "__main__":
    early.install()  # before the slow imports: a warning signal during them is kept, not fatal
    from .loop import main

    sys.exit(main())
