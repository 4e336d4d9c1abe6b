"""ipt_hpc: Instruction Pre-Training (Cheng et al., 2024) at HPC scale on Slurm."""

__version__ = "0.1.0"
