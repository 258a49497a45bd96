"""A real two-node launch on one machine: two network namespaces joined by a veth pair, one torchrun
"node" in each (1 rank per node, DP=2), meeting in torchrun's c10d rendezvous over the veth link. Each
node's command is planned by `hrm-mega launch --launcher torchrun --this-node` with its own --local-addr
and --socket-ifname; the first node hosts the rendezvous. The run directory is shared, as on a cluster
with a shared file system.

Checked: the two nodes train; a node that dies (all of its processes SIGKILLed) ends the other within
2 x parallel.timeout_minutes with the one-line collective error naming the dead node's address; both
nodes launched again resume from the last complete checkpoint and log the losses of an uninterrupted
run. Needs root (`ip netns`)."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_launch import (
    RECIPE,
    STEPS,
    build_deepspeed_ops,
    finish,
    latest_checkpoint,
    losses,
    sets,
    start,
    wait_for_step,
)

pytestmark = pytest.mark.slow
# torchrun's own agent log records. Under load the agents can race in their exit barrier after a run
# that succeeded (both nodes exit 0): the rendezvous host's agent leaves first and the other logs a
# DistNetworkError with its traceback. That is torch's shutdown, not the trainer's output.
ELASTIC_AGENT_LOG = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/")

TIMEOUT_MINUTES = 0.25  # collectives and the rendezvous join give up after 15 s
PORT = 29500  # the namespaces have ports of their own: no clash with other runs on this machine
CHECKPOINTS = "train.checkpoint_interval=4"


@dataclass(frozen=True)
class Node:
    netns: str
    ifname: str
    addr: str


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def namespace_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def kill_node(node: Node) -> None:
    """What a machine's power cut does to its processes: every process of the namespace gets SIGKILL
    (torchrun's ranks run in sessions of their own, so its process group alone is not enough)."""
    for _ in range(20):
        pids = namespace_pids(node.netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"processes still alive in {node.netns}: {namespace_pids(node.netns)}")


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Node, Node]]:
    """Two namespaces (unique names) with a veth pair between them on a random 10.x.y.0/24; removed with
    everything running in them at the end, also after a failure."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = uuid.uuid4().hex[:8]
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    pair = (
        Node(f"hrm-mega-{tag}-0", f"hm{tag}a", f"{subnet}.1"),
        Node(f"hrm-mega-{tag}-1", f"hm{tag}b", f"{subnet}.2"),
    )
    try:
        for node in pair:
            ip("netns", "add", node.netns)
        ip("link", "add", pair[0].ifname, "type", "veth", "peer", "name", pair[1].ifname)
        for node in pair:
            ip("link", "set", node.ifname, "netns", node.netns)
            ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
            ip("-n", node.netns, "link", "set", node.ifname, "up")
            ip("-n", node.netns, "link", "set", "lo", "up")
        yield pair
    finally:
        for node in pair:
            kill_node(node)
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", pair[0].ifname], capture_output=True)  # if never moved


@pytest.fixture(scope="module")
def dataset(tiny_sudoku: Path) -> Path:
    """The tiny sudoku dataset (conftest), once the DeepSpeed op that every run loads is built
    (test_launch.build_deepspeed_ops)."""
    build_deepspeed_ops()
    return tiny_sudoku


def node_cmd(node: Node, host: Node, run_dir: Path, data: Path, *overrides: str) -> list[str]:
    """This node's `hrm-mega launch ... --this-node`, run inside its namespace."""
    return [
        "ip", "netns", "exec", node.netns, sys.executable, "-m", "hrm_mega.entry.launch", RECIPE,
        "--nodes", "2", "--procs-per-node", "1", "--master-addr", host.addr, "--master-port", str(PORT),
        "--local-addr", node.addr, "--socket-ifname", node.ifname, "--this-node",
        *sets(run_dir, data, *overrides),
    ]  # fmt: skip


def start_nodes(pair: tuple[Node, Node], run_dir: Path, data: Path, *overrides: str):
    return [start(node_cmd(node, pair[0], run_dir, data, *overrides)) for node in pair]


def received_bytes(node: Node) -> int:
    stats = json.loads(ip("-n", node.netns, "-j", "-s", "link", "show", node.ifname))
    return stats[0]["stats64"]["rx"]["bytes"]


@pytest.fixture(scope="module")
def two_node_run(nodes, dataset, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted two-node run: its run directory and each node's output."""
    run_dir = tmp_path_factory.mktemp("two_nodes")
    procs = start_nodes(nodes, run_dir, dataset, CHECKPOINTS)
    outs = [finish(proc, timeout=600) for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    return run_dir, outs


def test_two_nodes_train_over_the_veth_link(nodes, two_node_run):
    run_dir, (first, second) = two_node_run
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert "world 2 = tp 1 x pp 1 x dp 2" in first  # rank 0 is on the first node and reports
    ours = "\n".join(line for line in (first + second).splitlines() if not ELASTIC_AGENT_LOG.match(line))
    assert "): error: " not in ours and "Traceback" not in ours
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == f"step-{STEPS:08d}"
    assert all((checkpoint / f"client/rank-0000{rank}.json").is_file() for rank in (0, 1))
    # The gradients crossed the veth link: 16 all-reduces of ~58k fp32 values are megabytes.
    assert min(received_bytes(node) for node in nodes) > 1_000_000


def test_a_dead_node_ends_the_other_in_time_and_both_resume_exactly(nodes, dataset, tmp_path, two_node_run):
    timeout_s = TIMEOUT_MINUTES * 60
    run_dir = tmp_path / "run"
    overrides = (CHECKPOINTS, f"parallel.timeout_minutes={TIMEOUT_MINUTES}")
    first, second = start_nodes(nodes, run_dir, dataset, *overrides)
    wait_for_step(first, run_dir, 5)
    killed_at = time.time()
    kill_node(nodes[1])
    out = finish(first, timeout=4 * timeout_s)
    elapsed = time.time() - killed_at
    finish(second, timeout=10)  # the dead node's launcher is gone too
    assert first.returncode != 0, out[-3000:]
    assert elapsed <= 2 * timeout_s, f"the surviving node took {elapsed:.1f} s to end:\n{out[-3000:]}"
    errors = [line for line in out.splitlines() if "): error: " in line]
    assert len(errors) == 1, out[-3000:]
    assert re.fullmatch(
        r"hrm-mega train \(rank 0\): error: after step \d+: a collective failed \(.+\): another rank or its "
        r"host died or stopped answering \(parallel.timeout_minutes=0.25\); the launcher's summary names the rank",
        errors[0],
    ), errors[0]
    assert f"[{nodes[1].addr}]" in errors[0]  # gloo names the dead node's address
    checkpoint = latest_checkpoint(run_dir)
    step = json.loads((checkpoint / "client/rank-00000.json").read_text())["step"]
    assert 4 <= step < STEPS and checkpoint.name == f"step-{step:08d}"

    # Both nodes launched again with the same commands: --resume auto continues from that checkpoint.
    procs = start_nodes(nodes, run_dir, dataset, *overrides)
    outs = [finish(proc, timeout=600) for proc in procs]
    for proc, node_out in zip(procs, outs):
        assert proc.returncode == 0, node_out[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in outs[0]
    assert losses(run_dir) == losses(two_node_run[0])
