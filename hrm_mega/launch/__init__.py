"""Launching training: plans for torchrun, the deepspeed launcher and Slurm (planner.py), host lists
(hosts.py), and the sbatch scripts (slurm/). `hrm-mega launch` (pipelines/launch.py) is the front end."""


class LaunchError(ValueError):
    """A launch request that cannot work; the message is one line naming the option or field."""
