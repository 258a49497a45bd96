"""Launching training: plans for torchrun, the deepspeed launcher and Slurm (planner.py), host lists
(hosts.py), and ranks started by a bare `srun` (srun.py). The sbatch scripts live in launch/slurm/ at the top of the repository (a wheel ships them as
hrm_mega/launch/slurm/). `hrm-mega launch` (hrm_mega/entry/launch.py) is the front end."""


class LaunchError(ValueError):
    """A launch request that cannot work; the message is one line naming the option or field."""
