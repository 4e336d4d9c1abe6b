"""``python -m ipt_hpc.train``: one training rank (torchrun and srun start one per device)."""

import sys

from .loop import main

# dist_checkpointing starts a spawn-mode helper process, which re-imports the main module: guard it.
if __name__ == "__main__":
    sys.exit(main())
