"""The ``train`` stage: Megatron-Core pre-training (TP/PP/DP) over the tokenized groups of a run.

Read in this order: :mod:`.config` (the ``train`` section), :mod:`.model` (GPTModel, Llama-style),
:mod:`.data` (blended GPT datasets, data order), :mod:`.loop` (one rank's training loop, signals),
:mod:`.checkpoint` (dist_checkpointing, torn-save safety), :mod:`.metrics` (logs), :mod:`.cpu_shims`
(CPU-only CI), :mod:`.stage` (what ``launch train`` does: local torchrun or a Slurm job).
Importing this package does not import torch.
"""

from ...config import TrainConfig

__all__ = ["TrainConfig"]
