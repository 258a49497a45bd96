"""Ranks started by `srun` itself, one Slurm task per rank, without torchrun.

torchrun and the deepspeed launcher tell each rank who it is through RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. `srun -N 2 --ntasks-per-node 4 python -m hrm_mega.entry.pretrain ...` sets
Slurm's own variables instead; without a mapping every task would be a world of one, and all of them
would write the same run directory. As Megatron-LM and torchtitan users expect, the Slurm variables of
the job step are read into torch.distributed's:

  RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID,
  MASTER_ADDR = the first host of SLURM_STEP_NODELIST,
  MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 (as launch/slurm/pretrain.sbatch) unless already set.

Only inside a job step (srun sets SLURM_STEP_NUM_TASKS; a batch script alone does not), and never over a
launcher's own variables.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from hrm_mega.launch import LaunchError
from hrm_mega.launch.hosts import expand_hostlist

STEP_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID")


def adopt_srun_environment(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the Slurm step's variables
    when this process is one of several srun tasks and no launcher set them. True if it did."""
    if "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return False
    tasks = int(environ["SLURM_STEP_NUM_TASKS"])
    if tasks <= 1:
        return False
    missing = [name for name in STEP_VARIABLES if not environ.get(name)]
    if missing:
        raise LaunchError(
            f"srun started {tasks} tasks but did not set {', '.join(missing)}; start the ranks with "
            "`hrm-mega launch --launcher slurm` (torchrun on each node) instead"
        )
    environ.update(
        RANK=environ["SLURM_PROCID"],
        WORLD_SIZE=str(tasks),
        LOCAL_RANK=environ["SLURM_LOCALID"],
        MASTER_ADDR=expand_hostlist(environ["SLURM_STEP_NODELIST"])[0],
    )
    environ.setdefault("MASTER_PORT", str(20000 + int(environ["SLURM_JOB_ID"]) % 20000))
    return True
