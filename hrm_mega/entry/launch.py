"""`hrm-mega launch`: checks a recipe's layout, then prints (--dry-run) or runs the exact torchrun,
deepspeed-launcher or sbatch command (hrm_mega/launch/planner.py; recipes in docs/launching.md).

hrm-mega launch --launcher torchrun --nodes 1 --procs-per-node 2 configs/puzzle/hrm_sudoku_tiny.yaml --dry-run

On one node it replaces itself with the launcher (exec), so signals reach the launcher directly and the
exit code is the launcher's. A multi-node torchrun plan is printed, to be run on every node (the Slurm
scripts do that with --this-node); a multi-node deepspeed plan is printed, to be run on the first host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from hrm_mega.entry.common import add_config_args, run_main
from hrm_mega.launch import LaunchError
from hrm_mega.launch.planner import (
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    LAUNCHERS,
    PRETRAIN_ENTRY,
    LaunchPlan,
    LaunchRequest,
    plan_launch,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrm-mega launch", description="plan and start a training run on torchrun, deepspeed or Slurm"
    )
    add_config_args(p)
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help="default: torchrun")
    p.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    p.add_argument(
        "--procs-per-node", type=int, default=1, help="ranks per machine, e.g. its GPUs (default 1)"
    )
    p.add_argument(
        "--resume", default="auto", help="auto (default) | none | PATH, handed to the entry script"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    p.add_argument(
        "--master-addr", default="", help="rendezvous host (default: this machine, or Slurm's first)"
    )
    p.add_argument(
        "--master-port", type=int, default=DEFAULT_PORT, help=f"rendezvous port (default {DEFAULT_PORT})"
    )
    p.add_argument("--hostfile", default="", help="deepspeed, --nodes > 1: `HOST slots=N` lines")
    p.add_argument(
        "--max-restarts", type=int, default=0,
        help="torchrun: restart all ranks this often after a failure; each restart resumes from the last "
        "complete checkpoint (default 0)",
    )  # fmt: skip
    p.add_argument("--rdzv-id", default="", help="torchrun rendezvous id (default: the run directory's name)")
    p.add_argument(
        "--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT,
        help=f"torchrun: seconds a rank gets after SIGTERM to write its checkpoint (default {DEFAULT_SHUTDOWN_TIMEOUT})",
    )  # fmt: skip
    p.add_argument("--entry", default=PRETRAIN_ENTRY, help=f"module the ranks run (default {PRETRAIN_ENTRY})")
    p.add_argument(
        "--this-node", action="store_true",
        help="torchrun, --nodes > 1: run this node's share here (every node runs the same command)",
    )  # fmt: skip
    p.add_argument(
        "--local-addr", default="",
        help="torchrun: the address this node advertises to the others (default: its hostname); the node "
        "whose --local-addr is --master-addr hosts the rendezvous",
    )  # fmt: skip
    p.add_argument(
        "--rdzv-host-is-this-node", action="store_true",
        help="torchrun: this node hosts the rendezvous (when torchrun cannot tell from --master-addr)",
    )  # fmt: skip
    p.add_argument(
        "--socket-ifname", default="",
        help="network interface the ranks connect over (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME)",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    request = LaunchRequest(
        config=args.config, overrides=tuple(args.overrides), launcher=args.launcher, nodes=args.nodes,
        procs_per_node=args.procs_per_node, resume=args.resume, master_addr=args.master_addr,
        master_port=args.master_port, hostfile=args.hostfile, max_restarts=args.max_restarts,
        rdzv_id=args.rdzv_id, shutdown_timeout=args.shutdown_timeout, entry=args.entry,
        local_addr=args.local_addr, rdzv_host_is_this_node=args.rdzv_host_is_this_node,
        socket_ifname=args.socket_ifname,
    )  # fmt: skip
    plan = plan_launch(request)
    if args.this_node and args.launcher != "torchrun":
        raise LaunchError("--this-node is for --launcher torchrun (every node runs the same command)")
    if not args.this_node:  # (the Slurm scripts print the plan once, not once per node)
        print(plan.script(), flush=True)
    if args.dry_run:
        return 0
    if plan.where == "each-node" and not args.this_node:
        print(f"# not started: run the command above on each of the {args.nodes} nodes, or this command with "
              "--this-node, or use --launcher slurm", flush=True)  # fmt: skip
        return 0
    if plan.where == "first-host":
        print("# not started: run the commands above on the first host of the hostfile", flush=True)
        return 0
    execute(plan)


def execute(plan: LaunchPlan) -> NoReturn:
    """Writes the plan's files and replaces this process with its command. The Python environment this
    runs in goes first on PATH, so that torchrun, deepspeed and the ranks are that environment's."""
    env = plan.environ(dict(os.environ))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    program = shutil.which(plan.argv[0], path=env["PATH"])
    if program is None:
        raise LaunchError(f"{plan.argv[0]} is not on PATH; install it here, or print the plan with --dry-run")
    for path, text in plan.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    os.execve(program, plan.argv, env)


def main(argv: list[str] | None = None) -> int:
    return run_main("launch", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
