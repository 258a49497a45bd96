"""Launching and fault tolerance: the launch planner (layouts, commands, hosts, environment), the docs'
commands against `hrm-mega launch --dry-run`, the sbatch scripts, and real runs on CPU/gloo: SIGTERM
ending a run with a checkpoint from which --resume auto continues exactly, a killed rank ending the job
within the timeout, torchrun restarts, and the deepspeed launcher."""

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from hrm_mega.entry.launch import main as launch_main
from hrm_mega.entry.plot import main as plot_main
from hrm_mega.launch import LaunchError
from hrm_mega.launch.hosts import deepspeed_hostfile, expand_hostlist
from hrm_mega.launch.planner import LaunchRequest, env_defaults, plan_launch, wrap_command
from hrm_mega.launch.srun import adopt_srun_environment
from hrm_mega.training.trainer import PREEMPTED_EXIT_CODE, SigtermFlag

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/puzzle/hrm_sudoku_tiny.yaml"
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.puzzle_emb_ndim=32", "model.h_layers=1",
    "model.l_layers=1", "model.halt_max_steps=4", "train.global_batch=8", "data.partitions=2",
    "optim.warmup_steps=2", "optim.lr=3e-3", "log.wandb=disabled", "log.log_interval=1",
    "log.progress_bar=false", "train.eval_modes=fixed", "train.eval_max_samples=8", "data.shuffle_buffer=16",
]  # fmt: skip
STEPS = 16


# --- the planner ---------------------------------------------------------------------------------------


def test_expand_hostlist_reads_slurm_node_lists():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("n[8-11]") == ["n8", "n9", "n10", "n11"]
    assert expand_hostlist("r[1-2]n[1-2]-ib") == ["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]
    assert expand_hostlist("a[001-002],b[9]") == ["a001", "a002", "b9"]
    for bad in ("gpu[01-03", "gpu[x]", "gpu[3-1]", "a,,b", ""):
        with pytest.raises(LaunchError, match="node list") as err:
            expand_hostlist(bad)
        assert "\n" not in str(err.value)


def test_deepspeed_hostfile_from_a_slurm_allocation():
    assert deepspeed_hostfile(["gpu01", "gpu02"], 8) == "gpu01 slots=8\ngpu02 slots=8\n"
    request = LaunchRequest(RECIPE, ("log.out_dir=runs/x",), launcher="deepspeed", nodes=2, procs_per_node=4)
    plan = plan_launch(request, environ={"SLURM_JOB_NODELIST": "gpu[07-09]"})
    assert plan.files == {"runs/x/hostfile": "gpu07 slots=4\ngpu08 slots=4\n"}
    argv = plan.argv
    assert argv[argv.index("--hostfile") + 1] == "runs/x/hostfile"
    assert argv[argv.index("--master_addr") + 1] == "gpu07"
    assert argv[argv.index("--num_nodes") + 1] == "2" and argv[argv.index("--num_gpus") + 1] == "4"
    assert plan.where == "first-host"
    with pytest.raises(LaunchError, match="--hostfile"):
        plan_launch(request, environ={})
    with pytest.raises(LaunchError, match="allocation has 1"):
        plan_launch(request, environ={"SLURM_JOB_NODELIST": "gpu01"})


def test_torchrun_plan_uses_c10d_the_config_timeout_and_resume_auto():
    request = LaunchRequest(
        RECIPE, ("parallel.timeout_minutes=0.5",), nodes=2, procs_per_node=4, master_addr="10.0.0.1",
        max_restarts=2, master_port=1234,
    )  # fmt: skip
    plan = plan_launch(request, environ={})
    options = dict(zip(plan.argv[1:], plan.argv[2:]))
    assert options["--nnodes"] == "2" and options["--nproc-per-node"] == "4"
    assert options["--rdzv-backend"] == "c10d" and options["--rdzv-endpoint"] == "10.0.0.1:1234"
    assert options["--rdzv-conf"] == "join_timeout=30" and options["--max-restarts"] == "2"
    assert options["--rdzv-id"] == "hrm_sudoku_tiny"  # the run directory's name
    assert plan.argv[-2:] == ["--resume", "auto"] and plan.where == "each-node"
    # Without --master-addr, a multi-node plan takes the first host of a Slurm allocation, or asks.
    slurm = plan_launch(LaunchRequest(RECIPE, nodes=2), environ={"SLURM_JOB_NODELIST": "c[3-4]"})
    assert "c3:29500" in slurm.argv
    with pytest.raises(LaunchError, match="--master-addr"):
        plan_launch(LaunchRequest(RECIPE, nodes=2), environ={})


def test_each_node_names_its_address_interface_and_whether_it_hosts_the_rendezvous():
    """--local-addr is handed to torchrun; the node whose address is --master-addr hosts the rendezvous
    store (torchrun's own guess misses addresses not behind the hostname); --socket-ifname sets the
    interface of gloo and NCCL."""
    nodes = {"nodes": 2, "master_addr": "10.1.0.1", "socket_ifname": "veth0"}
    first = plan_launch(LaunchRequest(RECIPE, local_addr="10.1.0.1", **nodes), environ={})
    options = dict(zip(first.argv[1:], first.argv[2:]))
    assert options["--local-addr"] == "10.1.0.1" and options["--rdzv-conf"] == "join_timeout=600,is_host=true"
    assert first.summary.endswith("this node is 10.1.0.1 and hosts the rendezvous")
    env = {e.name: e.value for e in first.env}
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "veth0"
    second = plan_launch(LaunchRequest(RECIPE, local_addr="10.1.0.2", **nodes), environ={})
    options = dict(zip(second.argv[1:], second.argv[2:]))
    assert options["--local-addr"] == "10.1.0.2" and options["--rdzv-conf"] == "join_timeout=600"
    # A rendezvous host named differently from the address this node advertises: say so explicitly.
    named = plan_launch(
        LaunchRequest(RECIPE, nodes=2, master_addr="head", rdzv_host_is_this_node=True), environ={}
    )
    assert "join_timeout=600,is_host=true" in named.argv and "--local-addr" not in named.argv
    plain = plan_launch(LaunchRequest(RECIPE, nodes=2, master_addr="head"), environ={})
    assert "join_timeout=600" in plain.argv and "GLOO_SOCKET_IFNAME" not in plain.script()
    # Slurm hands the interface on to the script's torchrun plans.
    slurm = plan_launch(LaunchRequest(RECIPE, launcher="slurm", nodes=2, socket_ifname="ib0"), environ={})
    assert slurm.argv[slurm.argv.index("--socket-ifname") + 1] == "ib0"


@pytest.mark.parametrize(
    "request_, message",
    [
        (LaunchRequest(RECIPE, launcher="deepspeed", local_addr="10.0.0.2"), "--local-addr is for --launcher torchrun"),
        (LaunchRequest(RECIPE, launcher="slurm", rdzv_host_is_this_node=True), "--rdzv-host-is-this-node is for"),
        (LaunchRequest(RECIPE, launcher="deepspeed", socket_ifname="eth0"), "~/.deepspeed_env"),
        (LaunchRequest(RECIPE, socket_ifname="eth0; reboot"), "is not a network interface name"),
    ],
)  # fmt: skip
def test_network_options_a_launcher_cannot_use_are_refused(request_, message):
    with pytest.raises(LaunchError, match=re.escape(message)) as err:
        plan_launch(request_, environ={})
    assert "\n" not in str(err.value)


def test_torchrun_restarts_get_a_new_store_each_time():
    """torchrun shares its rendezvous store with the ranks and keeps it across restarts; the restarted
    ranks then read the previous attempt's addresses (pytorch#135712). torchrun plans turn sharing off."""
    torchrun = plan_launch(LaunchRequest(RECIPE, procs_per_node=2, max_restarts=1), environ={})
    assert {e.name: e.value for e in torchrun.env}["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    deepspeed = plan_launch(LaunchRequest(RECIPE, launcher="deepspeed", procs_per_node=2), environ={})
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in deepspeed.script()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "slurm"])
def test_resume_auto_is_the_default_under_every_launcher(launcher):
    plan = plan_launch(LaunchRequest(RECIPE, launcher=launcher, procs_per_node=2), environ={})
    assert plan.argv[-2:] == ["--resume", "auto"]


def test_slurm_plan_hands_its_options_to_the_sbatch_script():
    request = LaunchRequest(RECIPE, ("train.steps=7",), launcher="slurm", nodes=3, procs_per_node=8,
                            max_restarts=1, resume="none")  # fmt: skip
    plan = plan_launch(request, environ={})
    assert plan.argv == [
        "sbatch", "--nodes", "3", "--ntasks-per-node", "1", "launch/slurm/pretrain.sbatch",
        "--procs-per-node", "8", "--max-restarts", "1", RECIPE, "--set=train.steps=7", "--resume", "none",
    ]  # fmt: skip
    with pytest.raises(LaunchError, match="Slurm picks the hosts"):
        plan_launch(LaunchRequest(RECIPE, launcher="slurm", master_addr="x"), environ={})


def test_layout_mismatch_is_a_one_line_error(capsys):
    argv = [RECIPE, "--nodes", "3", "--procs-per-node", "1", "--set", "parallel.tp=2", "--dry-run"]
    assert launch_main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        "hrm-mega launch: error: --nodes 3 x --procs-per-node 1 = 3 ranks is not a multiple of "
        "parallel.tp x parallel.pp = 2 x 1 = 2\n"
    )
    assert launch_main([RECIPE, "--nodes", "2", "--procs-per-node", "1", "--set", "parallel.tp=2",
                        "--set", "model.vocab_size=12", "--master-addr", "h", "--dry-run"]) == 0  # fmt: skip


def test_bad_config_is_a_one_line_error(capsys):
    assert launch_main([RECIPE, "--set", "parallel.timeout_minutes=0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hrm-mega launch: error: parallel.timeout_minutes=0")
    assert launch_main(["configs/nowhere.yaml", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_missing_launcher_or_a_misplaced_option_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here (nor in the venv's bin/)
    assert launch_main([RECIPE, "--launcher", "slurm", "--nodes", "2"]) == 2
    out = capsys.readouterr()
    assert out.out.startswith("# sbatch")  # the plan is printed before the launcher is looked for
    assert (
        out.err
        == "hrm-mega launch: error: sbatch is not on PATH; install it here, or print the plan with --dry-run\n"
    )
    assert launch_main([RECIPE, "--launcher", "deepspeed", "--this-node", "--dry-run"]) == 2
    assert "--this-node is for --launcher torchrun" in capsys.readouterr().err
    assert launch_main([RECIPE, "--entry", "hrm_mega.entry.nope", "--dry-run"]) == 2
    assert capsys.readouterr().err == "hrm-mega launch: error: --entry hrm_mega.entry.nope: no such module\n"


def test_rl_runs_plan_like_pretraining_with_their_own_entry():
    recipe = str(ROOT / "configs/rl/grpo_sudoku_tiny.yaml")
    init = "train.init_from=runs/demo/checkpoints/step-00000500"
    for launcher in ("torchrun", "deepspeed", "slurm"):
        request = LaunchRequest(recipe, (init,), launcher=launcher, procs_per_node=2,
                                entry="hrm_mega.entry.posttrain_rl")  # fmt: skip
        plan = plan_launch(request, environ={})
        assert "hrm_mega.entry.posttrain_rl" in plan.argv, launcher
        assert f"--set={init}" in plan.argv, launcher
    assert "launch/slurm/rl.sbatch" in plan.argv  # the RL job script (its job name) under Slurm


def test_printed_environment_defaults_equal_the_ones_applied_here():
    """The plan prints shell expressions (evaluated on each node) and applies Python values on this
    machine; both must agree, and a variable already set wins."""
    for procs in (1, 2, 3, 64):
        for default in env_defaults(procs, "torchrun", socket_ifname="eth1"):
            shell = subprocess.run(["bash", "-c", f"unset {default.name}; echo {default.shell}"],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            assert shell.stdout.strip() == default.value, (procs, default.name)
            kept = subprocess.run(["bash", "-c", f"{default.name}=7; echo {default.shell}"],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            assert kept.stdout.strip() == "7"
    plan = plan_launch(LaunchRequest(RECIPE, procs_per_node=2), environ={})
    assert plan.environ({"OMP_NUM_THREADS": "5"})["OMP_NUM_THREADS"] == "5"
    assert plan.environ({})["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


def test_wrapped_commands_split_back_into_the_same_arguments():
    argv = ["torchrun", "--nnodes", "1", "--rdzv-conf", "join_timeout=600", "-m", "hrm_mega.entry.pretrain",
            "configs/a b.yaml", "--set=x.y='q'", *[f"--set=k{i}=v" for i in range(20)]]  # fmt: skip
    text = wrap_command(argv, width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert shlex.split(text.replace("\\\n", " ")) == argv


def test_the_docs_show_what_dry_run_prints(capsys, monkeypatch):
    """Every `$ hrm-mega launch ...` block of docs/launching.md is exactly what the command prints."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    doc = (ROOT / "docs/launching.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", doc, flags=re.S)
    checked = 0
    for block in blocks:
        first, _, shown = block.partition("\n")
        words = shlex.split(first.removeprefix("$ "))
        assignments = {}
        while "=" in words[0] and not words[0].startswith("-"):
            name, _, value = words.pop(0).partition("=")
            assignments[name] = value
        if words[:2] != ["hrm-mega", "launch"]:
            continue
        assert "--dry-run" in words, first  # the docs never start a run from a test
        for name, value in assignments.items():
            monkeypatch.setenv(name, value)
        launch_main(words[2:])
        for name in assignments:
            monkeypatch.delenv(name)
        out = capsys.readouterr()
        assert out.out + out.err == shown, first
        checked += 1
    assert checked >= 5


def test_sbatch_scripts_parse_and_stay_in_step():
    pretrain = (ROOT / "launch/slurm/pretrain.sbatch").read_text()
    rl = (ROOT / "launch/slurm/rl.sbatch").read_text()
    for script in ("pretrain.sbatch", "rl.sbatch"):
        subprocess.run(["bash", "-n", str(ROOT / "launch/slurm" / script)], check=True)
    for needed in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                   'scontrol show hostnames "$SLURM_JOB_NODELIST"', "--this-node", "scontrol requeue",
                   "scancel --signal=TERM"):  # fmt: skip
        assert needed in pretrain, needed

    def body(text: str) -> list[str]:  # everything after the header, job name and entry aside
        lines = text[text.index("# Time limits and preemption") :].splitlines()
        return [x for x in lines if not x.startswith(("#SBATCH --job-name", "ENTRY="))]

    assert body(rl) == body(pretrain)
    assert "ENTRY=hrm_mega.entry.posttrain_rl" in rl and "ENTRY=hrm_mega.entry.pretrain" in pretrain


def test_sigterm_flag_is_set_by_the_signal_and_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    flag = SigtermFlag.install()
    try:
        assert not flag.on_any_rank()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert flag.received and flag.on_any_rank()  # one process: the all-reduce is the identity
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous


# --- real runs (CPU, gloo) -------------------------------------------------------------------------------


def build_deepspeed_ops() -> None:
    """Builds DeepSpeed's CPU shm_comm op (which every rank loads at start) into the tests' extension
    cache before any timed run: the first build takes minutes on 2 busy cores. A build that was killed
    (by a timeout, say) leaves its `lock` behind, and every later start waits on it for ever; a lock
    that no process holds open is such a leftover and is removed."""
    lock = Path(env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    if lock.exists() and not any(holds_open(p, lock) for p in psutil.process_iter()):
        lock.unlink(missing_ok=True)
    code = "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"
    done = run([sys.executable, "-c", code], timeout=540)  # within pytest's 600 s per test
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def holds_open(process: psutil.Process, path: Path) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(f.path == str(path) for f in process.open_files())
    return False


@pytest.fixture(scope="module")
def dataset(tiny_sudoku: Path) -> Path:
    """The tiny sudoku dataset (conftest), once the DeepSpeed op that every run loads is built."""
    build_deepspeed_ops()
    return tiny_sudoku


def env() -> dict[str, str]:
    """For every run of these tests. DeepSpeed JIT-builds its CPU shm_comm op at each start (ninja, into
    torch's extension cache), and rebuilds it, a minute or more here, whenever the previous build used
    another ninja (the venv's 1.13 and the system's 1.11 hash commands differently) or another
    environment's paths. So: this environment's bin/ first on PATH, as `hrm-mega launch` does, and a
    cache of its own."""
    return {
        **os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(extensions_dir()),
    }  # fmt: skip


def extensions_dir() -> Path:
    environment = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "torch_extensions" / f"hrm-mega-{environment}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(run_dir: Path, data: Path, *overrides: str) -> list[str]:
    items = [*TINY, f"train.steps={STEPS}", f"data.path={data}", f"log.out_dir={run_dir}", *overrides]
    return [f"--set={o}" for o in items]


def launch_cmd(run_dir: Path, data: Path, *overrides: str, procs: int = 2, options: tuple[str, ...] = ()):
    """`hrm-mega launch` (hrm_mega.entry.launch) of the tiny recipe on this machine."""
    return [sys.executable, "-m", "hrm_mega.entry.launch", RECIPE, "--procs-per-node", str(procs),
            "--master-port", str(free_port()), *options, *sets(run_dir, data, *overrides)]  # fmt: skip


def pretrain_cmd(run_dir: Path, data: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "hrm_mega.entry.pretrain", RECIPE, *sets(run_dir, data, *overrides)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(cmd: list[str]) -> subprocess.Popen:
    """A background run in its own session (so that a test can signal its whole process group)."""
    return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss; for steps logged twice (re-run after a resume) the last value counts."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def last_logged_step(run_dir: Path) -> int:
    """Of a run still writing metrics.jsonl (its last line may be incomplete)."""
    path, steps = run_dir / "metrics.jsonl", [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while last_logged_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def rank_process(launcher_pid: int, rank: int) -> psutil.Process:
    """The worker process of `rank` among the launcher's children."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under pid {launcher_pid}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to a run and all its descendants: torchrun starts each rank in a session of its own, so
    the launcher's process group alone would leave the ranks running."""
    with contextlib.suppress(psutil.Error):
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.kill()
    proc.communicate()


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


@pytest.fixture(scope="module")
def dp2_reference(dataset, tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted 2-rank run (torchrun through `hrm-mega launch`)."""
    run_dir = tmp_path_factory.mktemp("dp2_reference")
    done = run(launch_cmd(run_dir, dataset, "train.checkpoint_interval=4"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(losses(run_dir)) == STEPS
    return losses(run_dir)


@pytest.mark.slow
def test_sigterm_on_one_process_checkpoints_and_resume_auto_continues_exactly(tmp_path, dataset):
    """One rank, SIGTERM mid-run: exit code 75 after a complete checkpoint; the resumed run logs the
    losses of an uninterrupted run."""
    reference = run(pretrain_cmd(tmp_path / "ref", dataset))
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "run"
    proc = start(pretrain_cmd(run_dir, dataset))
    wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    checkpoint = latest_checkpoint(run_dir)
    step = json.loads((checkpoint / "client/rank-00000.json").read_text())["step"]
    assert 4 <= step < STEPS and checkpoint.name == f"step-{step:08d}"
    assert f"preempted: SIGTERM received, stopped after step {step}" in out
    assert max(losses(run_dir)) == step  # it stopped after that step

    resumed = run(pretrain_cmd(run_dir, dataset))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout
    assert losses(run_dir) == losses(tmp_path / "ref")


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, dataset, dp2_reference):
    """Two ranks under torchrun; only rank 1 gets SIGTERM. The flag is all-reduced, so both ranks stop
    after the same step and write one complete checkpoint; --resume auto then continues exactly."""
    run_dir = tmp_path / "run"
    command = launch_cmd(run_dir, dataset, "train.checkpoint_interval=4")
    proc = start(command)
    wait_for_step(proc, run_dir, 5)
    rank_process(proc.pid, 1).send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode != 0 and re.search(rf"exitcode\s*:\s*{PREEMPTED_EXIT_CODE}", out), out[-3000:]
    checkpoint = latest_checkpoint(run_dir)
    steps = {json.loads((checkpoint / f"client/rank-0000{r}.json").read_text())["step"] for r in (0, 1)}
    assert len(steps) == 1 and 5 <= steps.pop() < STEPS
    assert "preempted: SIGTERM received" in out

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stdout
    assert losses(run_dir) == dp2_reference


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path, dataset):
    timeout_s = 15
    run_dir = tmp_path / "run"
    proc = start(
        launch_cmd(run_dir, dataset, "train.steps=400", f"parallel.timeout_minutes={timeout_s / 60}")
    )
    wait_for_step(proc, run_dir, 3)
    victim = rank_process(proc.pid, 1)
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    out = finish(proc, timeout=4 * timeout_s)
    elapsed = time.time() - killed_at
    assert proc.returncode != 0
    assert elapsed <= 2 * timeout_s, f"the job took {elapsed:.1f} s to end"
    # torchrun's summary names the dead rank; the surviving rank says what happened in one line
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", out), out[-3000:]
    assert re.search(r"hrm-mega train \(rank 0\): error: after step \d+: a collective failed", out), out[
        -3000:
    ]


@pytest.mark.slow
def test_deepspeed_launcher_trains_two_ranks_on_cpu(tmp_path, dataset, dp2_reference):
    run_dir = tmp_path / "run"
    command = launch_cmd(run_dir, dataset, "train.checkpoint_interval=4", options=("--launcher", "deepspeed"))
    port = command[command.index("--master-port") + 1]
    try:
        done = run(command)
    finally:
        # The launcher sets LOCAL_SIZE, so each rank maps a 66 MB shared-memory all-reduce buffer named
        # after the master address and port, which DeepSpeed never unlinks.
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
            buffer.unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert losses(run_dir) == dp2_reference
    assert (latest_checkpoint(run_dir) / "client/rank-00001.json").is_file()


@pytest.mark.slow
def test_torchrun_restarts_resume_from_the_last_checkpoint(tmp_path, dataset, dp2_reference):
    """Rank 1 killed mid-run; torchrun --max-restarts 1 starts both ranks again, which resume from the last
    complete checkpoint and log the losses of an uninterrupted run. Before the plans set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the restarted ranks read the first attempt's gloo addresses
    from torchrun's shared store and exited 1 (`Gloo connectFullMesh failed ... Connection refused`)."""
    run_dir = tmp_path / "run"
    command = launch_cmd(
        run_dir, dataset, "train.checkpoint_interval=4", "log.wandb=offline", "log.tensorboard=true",
        options=("--max-restarts", "1"),
    )  # fmt: skip
    proc = start(command)
    wait_for_step(proc, run_dir, 6)
    killed_after = last_logged_step(run_dir)
    rank_process(proc.pid, 1).send_signal(signal.SIGKILL)
    out = finish(proc, timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out), out[-3000:]  # attempt 0 ended there
    resumed = re.search(r"resumed from (\S+)/step-(\d{8}) at step (\d+)", out)
    assert resumed, out[-3000:]
    step = int(resumed[3])
    assert resumed[1] == str(run_dir / "checkpoints") and int(resumed[2]) == step
    assert step % 4 == 0 and 4 <= step <= killed_after + 1  # the last checkpoint before the kill
    assert "connectFullMesh failed" not in out
    assert losses(run_dir) == dp2_reference
    # The trail is clean across the restart: one metrics.jsonl record and one TensorBoard value per
    # step, one W&B run (both attempts' offline directories carry the id kept in the run directory).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [e.step for e in tensorboard_scalars(run_dir / "tensorboard", "loss")] == list(range(1, STEPS + 1))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    attempts = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(f"-{run_id}") for name in attempts), attempts
    # stdout is a pipe, not a terminal: a plain progress line for every logged step, in both attempts.
    for s in range(1, STEPS + 1):
        assert re.search(
            rf"^step {s}/{STEPS}  loss \d+\.\d{{4}}  lr \S+  grad_norm \S+  .* eta \d+m\d\ds$", out, re.M
        ), s
    # `hrm-mega plot` draws the run: five panels (loss, lr, grad norm, accuracy, segments), 3 x 2.
    png = tmp_path / "curves.png"
    assert plot_main([str(run_dir), "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1386, 704)
        assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 20  # drawn, not blank


def tensorboard_scalars(log_dir: Path, tag: str) -> list:
    """The scalar events of `tag` as TensorBoard's own reader sees them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    events.Reload()
    return events.Scalars(tag)


@pytest.mark.slow
def test_launch_rejects_a_model_that_does_not_split_over_tp_before_submitting():
    out = subprocess.run(
        [sys.executable, "-m", "hrm_mega.entry.launch", "--launcher", "torchrun", "--nodes", "1", "--procs-per-node",
         "2", str(ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml"), "--set", "parallel.tp=2", "--dry-run"],
        env=env(), capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "hrm-mega launch: error: model.vocab_size=11 is not divisible by parallel.tp=2; pad it: set "
        "model.vocab_size=12 (the data's token ids stay below it)"
    )


def test_srun_tasks_take_rank_world_and_rendezvous_from_slurm():
    step = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
            "SLURM_STEP_NODELIST": "gpu[07-08]"}  # fmt: skip
    env = dict(step)
    assert adopt_srun_environment(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"
    }  # fmt: skip
    env = {**step, "MASTER_PORT": "29500"}
    assert adopt_srun_environment(env) and env["MASTER_PORT"] == "29500"
    # torchrun under srun (its RANK wins), one task, or a batch script (no job step): left alone
    for env in ({**step, "RANK": "0"}, {**step, "SLURM_STEP_NUM_TASKS": "1"}, {"SLURM_PROCID": "0"}):
        before = dict(env)
        assert not adopt_srun_environment(env) and env == before
    with pytest.raises(LaunchError, match=r"^srun started 4 tasks but did not set SLURM_LOCALID; start"):
        adopt_srun_environment({k: v for k, v in step.items() if k != "SLURM_LOCALID"})
