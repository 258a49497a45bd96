"""A real Slurm on this machine: munged, slurmctld and two slurmd daemons started by the test, with a
slurm.conf, state, logs and ports of their own in a temporary directory (nothing global is touched), and
stopped by their pids afterwards.

The two Slurm nodes are named 127.0.0.1 and 127.0.0.2: both loopback addresses reach this machine, and
the names resolve without /etc/hosts, so the rendezvous host the sbatch script takes from the allocation
works for torchrun. (Slurm maps a node named `localhost` to the machine's hostname, so two nodes cannot
be `localhost` and the hostname.) Each slurmd listens on its own port (`NodeName ... Port=`).

Debian's slurm-wlm and munge are installed with apt-get when they are missing (this needs root); the test
is skipped only when that is impossible. Run time: 4 to 7 minutes on 2 cores shared with other test
runs (load 5 to 10); most of it is the start of torch and DeepSpeed in the ranks, twice (the job runs
again after its requeue). The daemons start in about 5 s.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/puzzle/hrm_sudoku_tiny.yaml"
SBATCH_SCRIPT = ROOT / "launch/slurm/pretrain.sbatch"
NODES = ("127.0.0.1", "127.0.0.2")
STEPS = 60  # a few seconds of training: time for the signal to arrive mid-run
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.puzzle_emb_ndim=32", "model.h_layers=1",
    "model.l_layers=1", "model.halt_max_steps=2", "train.global_batch=8", "data.partitions=2",
    "optim.warmup_steps=2", "log.wandb=disabled", "log.log_interval=1", "log.progress_bar=false",
    "train.eval_modes=fixed", "train.eval_max_samples=8", "data.shuffle_buffer=16", f"train.steps={STEPS}",
]  # fmt: skip
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}  # fmt: skip


# --- installing and starting Slurm ------------------------------------------------------------------------


def find_programs() -> dict[str, str] | None:
    """Full paths of the Slurm and munge programs (the daemons live in sbin), or None if one is missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    found = {name: shutil.which(name, path=path) or "" for name in PROGRAMS}
    return found if all(found.values()) else None


def install_slurm() -> dict[str, str]:
    """Debian's slurm-wlm and munge, installed when missing. The daemons are not started by the install
    (in a container policy-rc.d forbids it; the test starts its own)."""
    if (found := find_programs()) is not None:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip(
            "Slurm (slurmctld, slurmd, munged) is not installed and there is no apt-get to install it"
        )
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing it (apt-get) and running slurmd need root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a stale package index: refresh it once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"apt-get install slurm-wlm munge failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    found = find_programs()
    assert found is not None, "slurm-wlm and munge are installed but a program is still missing"
    return found


def free_port(low: int = 0, high: int = 0) -> int:
    """A port nothing listens on: any (low = 0), or one drawn from [low, high)."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randrange(low, high) if low else 0))
            except OSError:
                continue
            return s.getsockname()[1]
    raise AssertionError(f"no free port in [{low}, {high})")


def slurm_conf(tmp: Path, ctld_port: int, node_ports: list[int], first_job_id: int) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={name} Port={port} CPUs=1 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""\
# A two-node Slurm on this machine, for tests/test_slurm.py
ClusterName=hrmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={tmp}/munge/munge.socket,cred_expire=20
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool/%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd-%n.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# finished jobs stay visible to `scontrol show job` (there is no accounting database)
MinJobAge=600
FirstJobId={first_job_id}
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    programs: dict[str, str]
    env: dict[str, str]  # SLURM_CONF and what the ranks need (PYTHONPATH, one OMP thread, ...)
    logs: Path

    def run(self, *argv: str, check: bool = True, cwd: Path | None = None) -> str:
        """A Slurm command against this cluster (sbatch submits from `cwd`: its log goes there)."""
        done = subprocess.run([self.programs.get(argv[0], argv[0]), *argv[1:]], env=self.env, cwd=cwd,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert not check or done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
        return done.stdout

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, ...)."""
        fields = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while (job := self.job(job_id))["JobState"] not in FINAL_STATES:
            assert time.time() < deadline, f"job {job_id} still {job['JobState']} after {timeout} s"
            time.sleep(0.5)
        return job

    def daemon_logs(self) -> str:
        return "".join(f"\n== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.logs.glob("*")))


def start_daemon(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """In the foreground (so that its pid is the one to stop) and in its own session."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(ready: Callable[[], bool], what: str, daemons: list[subprocess.Popen], cluster: Cluster) -> None:
    deadline = time.time() + 60
    while not ready():
        dead = [p.args[0] for p in daemons if p.poll() is not None]
        assert not dead, f"Slurm daemons died: {dead}{cluster.daemon_logs()}"
        assert time.time() < deadline, f"no {what} after 60 s{cluster.daemon_logs()}"
        time.sleep(0.2)


def nodes_idle(cluster: Cluster) -> bool:
    states = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False).split()
    return states[1::2] == ["idle"] * len(NODES)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """munged, slurmctld and one slurmd per node; stopped by their pids afterwards, whatever happened."""
    programs = install_slurm()
    tmp = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "log", "spool"):
        (tmp / sub).mkdir()
    (tmp / "munge").chmod(0o755)  # munged wants everyone to be able to reach its socket
    key = tmp / "munge/munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    # The sbatch script's rendezvous port is 20000 + job id % 20000: the first job id makes it a free one.
    first_job_id = free_port(20001, 40000) - 20000
    conf = tmp / "slurm.conf"
    node_ports = [free_port() for _ in NODES]
    conf.write_text(slurm_conf(tmp, free_port(), node_ports, first_job_id))

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}  # in case pytest runs in a job
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
               HRM_MEGA_PYTHON=sys.executable)  # fmt: skip
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cluster = Cluster(programs, env, tmp / "log")
    daemons: list[subprocess.Popen] = []
    try:
        munge = [programs["munged"], "--force", "--foreground", f"--socket={tmp}/munge/munge.socket",
                 f"--key-file={key}", f"--pid-file={tmp}/munge/munged.pid", f"--seed-file={tmp}/munge/seed",
                 f"--log-file={tmp}/log/munged.log"]  # fmt: skip
        daemons.append(start_daemon(munge, tmp / "log/munged.out", env))
        wait_for(lambda: (tmp / "munge/munge.socket").exists(), "munged's socket", daemons, cluster)
        daemons.append(
            start_daemon([programs["slurmctld"], "-D", "-f", str(conf)], tmp / "log/slurmctld.out", env)
        )
        for node in NODES:
            slurmd = [programs["slurmd"], "-D", "-N", node, "-f", str(conf)]
            daemons.append(start_daemon(slurmd, tmp / f"log/slurmd-{node}.out", env))
        wait_for(lambda: nodes_idle(cluster), "idle Slurm nodes", daemons, cluster)
        yield cluster
    finally:
        try:  # cancel what is left of our jobs first, so that no rank outlives the daemons
            if len(daemons) > 1 and (jobs := cluster.run("squeue", "--noheader", "--format=%i", check=False)):
                cluster.run("scancel", *jobs.split(), check=False)
                deadline = time.time() + 30
                while cluster.run("squeue", "--noheader", check=False).strip() and time.time() < deadline:
                    time.sleep(0.5)
        finally:
            for proc in reversed(daemons):  # the slurmds, slurmctld, then munged
                stop_daemon(proc)


# --- the jobs -----------------------------------------------------------------------------------------


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in overrides]


def job_log(submit_dir: Path, job_id: int) -> str:
    """The script's #SBATCH --output: hrm-mega-pretrain-JOBID.out in the submission directory."""
    path = submit_dir / f"hrm-mega-pretrain-{job_id}.out"
    return path.read_text() if path.exists() else f"(no {path.name})"


def last_logged_step(run_dir: Path) -> int:
    """Of a run still writing metrics.jsonl (its last line may be incomplete)."""
    path, steps = run_dir / "metrics.jsonl", [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return max(steps)


@pytest.mark.timeout(900)  # the first test also installs Slurm when it is missing
def test_two_ranks_on_two_nodes_checkpoint_on_usr1_requeue_and_complete(cluster, tiny_sudoku, tmp_path):
    """`hrm-mega launch --launcher slurm --nodes 2` submits pretrain.sbatch; each Slurm node runs one
    torchrun, and the two ranks train together. Slurm's warning before the time limit (SIGUSR1 to the
    script, --signal=B:USR1@120; sent here by hand) makes the ranks write a checkpoint and stop, and the
    script requeue the job; the next run resumes from it and completes: every step logged, a complete
    final checkpoint of both ranks."""
    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [sys.executable, "-m", "hrm_mega.entry.launch", "--launcher", "slurm", "--nodes", "2", "--procs-per-node",
         "1", str(RECIPE), *sets(*TINY, f"data.path={tiny_sudoku}", f"log.out_dir={run_dir}")],
        env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert f"sbatch --nodes 2 --ntasks-per-node 1 {SBATCH_SCRIPT}" in submit.stdout
    job_id = int(submit.stdout.split("Submitted batch job")[1].split()[0])

    deadline = time.time() + 240
    while last_logged_step(run_dir) < 1:
        job = cluster.job(job_id)
        assert job["JobState"] in ("PENDING", "RUNNING"), job_log(tmp_path, job_id)[-4000:]
        assert time.time() < deadline, f"no training step within 240 s{job_log(tmp_path, job_id)[-4000:]}"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))  # what Slurm does 120 s before the limit

    job = cluster.wait(job_id, timeout=300)
    log = job_log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:] + cluster.daemon_logs()
    assert job["Restarts"] == "1", (
        f"the job was not requeued (did it finish before the signal?)\n{log[-4000:]}"
    )
    assert job["NumNodes"] == "2" and job["NodeList"] == "127.0.0.[1-2]", job
    for node in NODES:  # both runs started their step on both nodes
        assert (cluster.logs / f"slurmd-{node}.log").read_text().count(f"launch task StepId={job_id}.0") == 2
    # the plan the script printed: both nodes, the first as rendezvous host, the port from the job id
    assert "# torchrun on each of the 2 nodes; the rendezvous is on 127.0.0.1" in log
    assert "# 2 nodes x 1 processes = 2 ranks = tp 1 x pp 1 x dp 2" in log
    assert f"--rdzv-endpoint 127.0.0.1:{20000 + job_id % 20000}" in log and f"--rdzv-id {job_id}" in log
    # the first run: checkpoint, stop, requeue; the second resumes where it stopped
    assert "hrm-mega: time limit or preemption ahead" in log and f"requeueing job {job_id}" in log
    stopped = int(log.split("preempted: SIGTERM received, stopped after step ")[1].split()[0])
    assert 1 <= stopped < STEPS and f"at step {stopped}" in log, log[-4000:]  # "resumed from ... at step N"
    # The only tracebacks are torchrun's own report of the SIGTERM it got; the ranks stopped cleanly.
    assert log.count("Traceback") == log.count("SignalException: Process"), log[-4000:]

    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == list(range(1, STEPS + 1)), logged
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert latest.name == f"step-{STEPS:08d}" and not list((checkpoints / ".staging").glob("*"))
    for rank in (0, 1):
        client = json.loads((latest / f"client/rank-{rank:05d}.json").read_text())
        assert client["step"] == STEPS and client["world_size"] == 2
        assert (latest / f"client/rank-{rank:05d}.safetensors").is_file()
    assert list(latest.glob("*model_states.pt")), sorted(p.name for p in latest.iterdir())


def test_bad_config_fails_the_job_fast_with_a_one_line_error(cluster, tiny_sudoku, tmp_path):
    """Submitted by hand (hrm-mega launch would refuse it before sbatch): the script's dry run ends the
    job at once, and the log says why in one line."""
    bad = sets(*TINY, "train.global_batch=7", f"data.path={tiny_sudoku}", f"log.out_dir={tmp_path / 'run'}")
    submitted = time.time()
    job_id = int(cluster.run("sbatch", "--parsable", "--nodes", "2", str(SBATCH_SCRIPT), str(RECIPE), *bad,
                             cwd=tmp_path).strip())  # fmt: skip
    job = cluster.wait(job_id, timeout=60)
    elapsed = time.time() - submitted
    log = job_log(tmp_path, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log
    assert elapsed < 30, f"the job took {elapsed:.1f} s to fail"
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert errors == ["hrm-mega launch: error: data.partitions=2 does not divide train.global_batch=7"], log
    assert "Traceback" not in log and "torchrun" not in log, log  # it stopped before starting anything
    assert not (tmp_path / "run").exists()


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_srun_tasks_train_one_dp2_run_with_torchruns_losses(cluster, tiny_sudoku, tmp_path):
    """`srun --nodes 2 --ntasks 2 python -m hrm_mega.entry.pretrain ...`, no torchrun: each task takes its
    rank, the world size and the rendezvous host from Slurm's variables, and the two train one DP=2 run
    with the losses of torchrun's DP=2 run (not two worlds of one writing one directory)."""
    overrides = [*TINY, "train.steps=8", f"data.path={tiny_sudoku}"]
    reference = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
         "hrm_mega.entry.pretrain", str(RECIPE), *sets(*overrides, f"log.out_dir={tmp_path / 'torchrun'}")],
        env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    run = subprocess.run(
        [cluster.programs["srun"], "--nodes", "2", "--ntasks", "2", "--kill-on-bad-exit=1", sys.executable,
         "-m", "hrm_mega.entry.pretrain", str(RECIPE), *sets(*overrides, f"log.out_dir={tmp_path / 'srun'}")],
        env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + cluster.daemon_logs()
    assert run.stdout.count("hrm-mega train (puzzle)") == 1  # rank 0 alone reports
    assert "world 2 = tp 1 x pp 1 x dp 2" in run.stdout, run.stdout[-3000:]
    assert losses(tmp_path / "srun") == losses(tmp_path / "torchrun")
    assert sorted(losses(tmp_path / "srun")) == list(range(1, 9))
