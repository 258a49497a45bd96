"""Launch helpers for torchrun, the deepspeed launcher and Slurm."""
