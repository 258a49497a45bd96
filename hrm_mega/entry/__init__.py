"""Entry points: the modules that launchers start (`torchrun -m hrm_mega.entry.pretrain`, deepspeed
--module, srun) and that `hrm-mega` commands run. One module per entry point; they parse argv and only
wire library parts together. pipelines/ at the top of the repository holds a thin script for each."""
