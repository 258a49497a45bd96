"""Launch plans: from a recipe and a node layout to the exact command of torchrun, the deepspeed launcher
or sbatch, with the environment defaults every rank needs.

`hrm-mega launch` prints a plan (--dry-run) or runs it; docs/launching.md shows the same text (a test
compares them). A plan is a small shell script: comments, `export NAME=${NAME:-default}` lines (a value
already set wins) and the command. The defaults are shell expressions, so a printed plan is right on
whichever node runs it. Nothing here starts a process: hrm_mega/entry/launch.py does.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hrm_mega.config import Config, read_config, resolve_layout
from hrm_mega.launch import LaunchError
from hrm_mega.launch.hosts import deepspeed_hostfile, expand_hostlist
from hrm_mega.resources import slurm_scripts_dir

LAUNCHERS = ("torchrun", "deepspeed", "slurm")
DEFAULT_PORT = 29500
# Seconds a rank gets between SIGTERM and SIGKILL to finish its step and write the last checkpoint.
# The sbatch scripts get USR1 120 s before the time limit (--signal=B:USR1@120) and turn it into SIGTERM
# for the ranks: 90 s leaves slack.
DEFAULT_SHUTDOWN_TIMEOUT = 90
PRETRAIN_ENTRY = "hrm_mega.entry.pretrain"  # the modules the ranks run (--entry)
RL_ENTRY = "hrm_mega.entry.posttrain_rl"
WIDTH = 104  # printed commands are wrapped (with `\`) at option boundaries to this width


@dataclass(frozen=True)
class LaunchRequest:
    """What `hrm-mega launch` was asked for (its command-line options)."""

    config: str
    overrides: tuple[str, ...] = ()
    launcher: str = "torchrun"
    nodes: int = 1
    procs_per_node: int = 1
    resume: str = "auto"
    master_addr: str = ""  # the rendezvous host; default: this machine (one node), Slurm's first host
    master_port: int = DEFAULT_PORT
    hostfile: str = ""  # deepspeed: default written from the Slurm allocation
    max_restarts: int = 0
    rdzv_id: str = ""  # default: the run directory's name
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT
    entry: str = PRETRAIN_ENTRY
    local_addr: str = ""  # torchrun: the address this node advertises (default: its hostname)
    rdzv_host_is_this_node: bool = False  # torchrun: this node hosts the rendezvous store
    socket_ifname: str = ""  # the network interface gloo and NCCL connect over (default: their pick)


@dataclass(frozen=True)
class EnvDefault:
    """An environment variable every rank gets unless it is already set."""

    name: str
    shell: str  # the default as a shell expression, evaluated on the node that runs the plan
    value: str  # the same default on this machine
    why: str


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    where: str  # "here" (this machine runs it), "each-node" (every node runs it) or "first-host"
    summary: str  # which launcher, where
    layout: str  # nodes x processes = ranks = tp x pp x dp
    env: list[EnvDefault] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # written before the command (deepspeed hostfile)

    def script(self) -> str:
        """The plan as shell text: what --dry-run prints and docs/launching.md shows."""
        lines = [f"# {self.summary}", f"# {self.layout}"]
        for path, text in self.files.items():
            lines.append(f"mkdir -p {shlex.quote(str(Path(path).parent))}")
            lines += [f"cat > {shlex.quote(path)} <<'EOF'", *text.splitlines(), "EOF"]
        lines += [f"export {e.name}={e.shell}  # {e.why}" for e in self.env]
        lines.append(wrap_command(self.argv))
        return "\n".join(lines)

    def environ(self, base: dict[str, str]) -> dict[str, str]:
        """`base` plus the defaults it does not set (what the exports do, computed here)."""
        return {**{e.name: e.value for e in self.env}, **base}


def plan_launch(request: LaunchRequest, environ: dict[str, str] | None = None) -> LaunchPlan:
    """Checks the config and the layout, then plans the launch. `environ` (default os.environ) is read
    for Slurm's SLURM_JOB_NODELIST only."""
    environ = dict(os.environ if environ is None else environ)
    if request.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher {request.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    for name in ("nodes", "procs_per_node"):
        if getattr(request, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 1")
    if not _module_exists(request.entry):
        raise LaunchError(f"--entry {request.entry}: no such module")
    _check_network_options(request)
    config = read_config(request.config, list(request.overrides))
    config.parallel.validate()
    layout = check_launch_layout(
        config, request.nodes, request.procs_per_node
    )  # first: names --nodes, --procs
    # the rest, and what starting the entry's command needs (manifest, rl section); the batch-vs-dp checks
    # are left to the ranks, since the documented plans put tiny recipes on more ranks than partitions
    command = {"posttrain_rl": "rl", "pretrain": "train"}.get(request.entry.rsplit(".", 1)[-1])
    config.validate(command=command)  # type: ignore[arg-type]
    if request.launcher == "slurm":
        return _plan_slurm(request, layout)
    if request.launcher == "deepspeed":
        return _plan_deepspeed(request, config, layout, environ)
    return _plan_torchrun(request, config, layout, environ)


def check_launch_layout(config: Config, nodes: int, procs_per_node: int) -> str:
    """Checks that nodes x processes per node fill whole tensor x pipeline groups of the config, and that
    the model splits at that layout; returns the layout in words."""
    tp, pp = config.parallel.tp, config.parallel.pp
    world = nodes * procs_per_node
    if world % (tp * pp):
        raise LaunchError(
            f"--nodes {nodes} x --procs-per-node {procs_per_node} = {world} ranks is not a multiple of "
            f"parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp}"
        )
    resolve_layout(config, world)  # heads, kv heads, MLP width, vocab, CycleBlocks vs tp and pp
    nodes_text, dp = f"{nodes} node{'s' if nodes > 1 else ''}", world // (tp * pp)
    return f"{nodes_text} x {procs_per_node} processes = {world} ranks = tp {tp} x pp {pp} x dp {dp}"


def env_defaults(
    procs_per_node: int, launcher: str = "torchrun", socket_ifname: str = ""
) -> list[EnvDefault]:
    """OMP threads: the node's cores shared by its ranks (torchrun alone would set 1). NCCL: say why a
    collective failed (GPU hosts; gloo ignores it). torchrun: a fresh store for every restart. With
    `socket_ifname`, the interface gloo and NCCL use. Site-specific settings are in docs/launching.md."""
    p = procs_per_node
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = [
        EnvDefault(
            "OMP_NUM_THREADS",
            f"${{OMP_NUM_THREADS:-$(( $(nproc) > {p} ? $(nproc) / {p} : 1 ))}}",
            str(max(1, cores // p)),
            "the node's cores per rank",
        ),
        EnvDefault("NCCL_DEBUG", "${NCCL_DEBUG:-WARN}", "WARN", "NCCL says why a collective failed"),
    ]
    if launcher == "torchrun":
        # torchrun's c10d rendezvous shares its store with the ranks and keeps it across restarts, so a
        # restarted rank can read the previous attempt's addresses and fail to connect (pytorch#135712).
        # Off, rank 0 hosts a new store on a new port for every attempt.
        env.append(_default("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1", "a new store for every restart"))
    if socket_ifname:
        env += [
            _default("GLOO_SOCKET_IFNAME", socket_ifname, "the interface gloo connects over"),
            _default("NCCL_SOCKET_IFNAME", socket_ifname, "the interface NCCL bootstraps over"),
        ]
    return env


def _default(name: str, value: str, why: str) -> EnvDefault:
    return EnvDefault(name, f"${{{name}:-{value}}}", value, why)


# --- the launchers ------------------------------------------------------------------------------------


def _plan_torchrun(
    request: LaunchRequest, config: Config, layout: str, environ: dict[str, str]
) -> LaunchPlan:
    r = request
    host = _rendezvous_host(r, environ)
    # nodes that have not joined after the collective timeout of the config are given up on
    rdzv_conf = f"join_timeout={timeout_seconds(config)}"
    # torchrun guesses whether this node hosts the rendezvous store from its hostname and the addresses
    # that name resolves to; an address on another interface is missed, and then no node hosts it.
    hosts_store = r.rdzv_host_is_this_node or (r.nodes > 1 and r.local_addr == host)
    if hosts_store:
        rdzv_conf += ",is_host=true"
    argv = [
        "torchrun", "--nnodes", str(r.nodes), "--nproc-per-node", str(r.procs_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{r.master_port}",
        "--rdzv-id", r.rdzv_id or Path(config.log.out_dir).name, "--rdzv-conf", rdzv_conf,
        *(["--local-addr", r.local_addr] if r.local_addr else []),
        "--max-restarts", str(r.max_restarts), "--shutdown-timeout", str(r.shutdown_timeout),
        "-m", r.entry, *_entry_args(r),
    ]  # fmt: skip
    env = env_defaults(r.procs_per_node, "torchrun", r.socket_ifname)
    if r.nodes == 1:
        return LaunchPlan(argv, "here", "torchrun on this machine", layout, env)
    summary = f"torchrun on each of the {r.nodes} nodes; the rendezvous is on {host}"
    if r.local_addr:
        summary += f"; this node is {r.local_addr}"
    if hosts_store:
        summary += " and hosts the rendezvous" if r.local_addr else "; this node hosts it"
    return LaunchPlan(argv, "each-node", summary, layout, env)


def _plan_deepspeed(
    request: LaunchRequest, config: Config, layout: str, environ: dict[str, str]
) -> LaunchPlan:
    r = request
    files: dict[str, str] = {}
    argv = ["deepspeed"]
    if r.nodes > 1:
        hostfile = r.hostfile
        if not hostfile:
            nodelist = environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise LaunchError(
                    "--launcher deepspeed with --nodes > 1 needs --hostfile FILE (lines `HOST slots=N`), "
                    "or a Slurm allocation to write one from"
                )
            hosts = _first_hosts(expand_hostlist(nodelist), r.nodes)
            hostfile = str(Path(config.log.out_dir) / "hostfile")
            files[hostfile] = deepspeed_hostfile(hosts, r.procs_per_node)
        argv += ["--hostfile", hostfile]
    elif r.hostfile:
        raise LaunchError("--hostfile is for multi-node deepspeed launches (--nodes > 1)")
    # --num_gpus is the deepspeed launcher's name for processes per node; on CPU it starts that many
    # ranks. --no_local_rank: the ranks read LOCAL_RANK from the environment, not a --local_rank flag.
    argv += ["--num_nodes", str(r.nodes), "--num_gpus", str(r.procs_per_node)]
    if r.master_addr or r.nodes == 1 or environ.get("SLURM_JOB_NODELIST"):
        argv += ["--master_addr", _rendezvous_host(r, environ)]
    # (otherwise deepspeed asks the first host of the hostfile for its address over ssh)
    argv += ["--master_port", str(r.master_port), "--no_local_rank", "--module", r.entry, *_entry_args(r)]
    if r.nodes == 1:
        summary = "deepspeed launcher on this machine"
        return LaunchPlan(argv, "here", summary, layout, env_defaults(r.procs_per_node, "deepspeed"))
    summary = "deepspeed launcher on the first host; it starts every node over pdsh/ssh"
    env = env_defaults(r.procs_per_node, "deepspeed")
    return LaunchPlan(argv, "first-host", summary, layout, env, files)


def _plan_slurm(request: LaunchRequest, layout: str) -> LaunchPlan:
    """sbatch of launch/slurm/pretrain.sbatch (rl.sbatch for RL runs; shipped in the wheel, found by
    hrm_mega.resources). The script's arguments are this command's options, so that on the allocation
    it plans each node's torchrun the same way (the hosts come from Slurm)."""
    r = request
    if r.master_addr or r.hostfile:
        raise LaunchError(
            "--master-addr and --hostfile do not apply to --launcher slurm; Slurm picks the hosts"
        )
    script = slurm_scripts_dir() / ("rl.sbatch" if r.entry == RL_ENTRY else "pretrain.sbatch")
    argv = [
        "sbatch", "--nodes", str(r.nodes), "--ntasks-per-node", "1", _display_path(script),
        "--procs-per-node", str(r.procs_per_node), *_changed_options(r), *_entry_args(r),
    ]  # fmt: skip
    return LaunchPlan(argv, "here", "sbatch; the script starts one torchrun per node", layout)


# --- helpers ------------------------------------------------------------------------------------------


def timeout_seconds(config: Config) -> int:
    """parallel.timeout_minutes in whole seconds (at least 1)."""
    return max(1, math.ceil(round(config.parallel.timeout_minutes * 60, 6)))  # 0.1 min -> 6 s, not 7


def wrap_command(argv: list[str], width: int = WIDTH) -> str:
    """The command as shell text, continued with `\\` at option boundaries when longer than `width`."""
    groups: list[str] = []
    i = 0
    while i < len(argv):  # an option and its value stay together
        group = [argv[i]]
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            group.append(argv[i + 1])
        groups.append(shlex.join(group))
        i += len(group)
    lines, line = [], groups[0]
    for group in groups[1:]:
        if len(line) + 1 + len(group) + 2 > width:
            lines.append(line + " \\")
            line = "    " + group
        else:
            line += " " + group
    return "\n".join([*lines, line])


def _entry_args(r: LaunchRequest) -> list[str]:
    """The entry script's arguments: the recipe, its overrides and --resume (auto unless asked)."""
    return [r.config, *[f"--set={o}" for o in r.overrides], "--resume", r.resume]


def _changed_options(r: LaunchRequest) -> list[str]:
    """Options that differ from their defaults, for the sbatch script to hand on."""
    out = []
    if r.max_restarts:
        out += ["--max-restarts", str(r.max_restarts)]
    if r.shutdown_timeout != DEFAULT_SHUTDOWN_TIMEOUT:
        out += ["--shutdown-timeout", str(r.shutdown_timeout)]
    if r.master_port != DEFAULT_PORT:
        out += ["--master-port", str(r.master_port)]
    if r.rdzv_id:
        out += ["--rdzv-id", r.rdzv_id]
    if r.entry != LaunchRequest.entry:
        out += ["--entry", r.entry]
    if r.socket_ifname:
        out += ["--socket-ifname", r.socket_ifname]
    return out


def _check_network_options(r: LaunchRequest) -> None:
    """The per-node network options are torchrun's; an interface name must look like one."""
    for option, given in (
        ("--local-addr", r.local_addr),
        ("--rdzv-host-is-this-node", r.rdzv_host_is_this_node),
    ):
        if given and r.launcher != "torchrun":
            raise LaunchError(f"{option} is for --launcher torchrun, which runs on each node itself")
    if r.socket_ifname and r.launcher == "deepspeed":
        raise LaunchError(
            "--socket-ifname is for --launcher torchrun or slurm; with deepspeed, put GLOO_SOCKET_IFNAME and "
            "NCCL_SOCKET_IFNAME into ~/.deepspeed_env, which the launcher hands to every node"
        )
    if r.socket_ifname and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", r.socket_ifname):
        raise LaunchError(
            f"--socket-ifname {r.socket_ifname!r} is not a network interface name (e.g. eth0, ib0)"
        )


def _rendezvous_host(r: LaunchRequest, environ: dict[str, str]) -> str:
    if r.master_addr:
        return r.master_addr
    if r.nodes == 1:
        return "127.0.0.1"
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError(
            f"--nodes {r.nodes} needs --master-addr HOST (the first node; every node must reach it), "
            "or a Slurm allocation to take the first host from"
        )
    return _first_hosts(expand_hostlist(nodelist), r.nodes)[0]


def _first_hosts(hosts: list[str], nodes: int) -> list[str]:
    if len(hosts) < nodes:
        raise LaunchError(f"--nodes {nodes} but the Slurm allocation has {len(hosts)}: {','.join(hosts)}")
    return hosts[:nodes]


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _display_path(path: Path) -> str:
    """Relative to the working directory when inside it (as the docs show it), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
