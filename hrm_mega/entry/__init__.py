"""Entry scripts that launchers start (torchrun, deepspeed, srun). They only wire library parts together."""
