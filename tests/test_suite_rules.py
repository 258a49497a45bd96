"""The test suite's own rule (tests/conftest.py): a test that starts a run is marked slow, so that
`pytest -m "not slow"` (`make test-unit`) is a unit suite; CI runs everything."""

import subprocess
import sys

import pytest
from conftest import module_cmd, starts_a_run


def test_commands_that_start_runs_are_recognised() -> None:
    assert starts_a_run(module_cmd("pipelines.pretrain", ["recipe.yaml"]))
    assert starts_a_run(module_cmd("hrm_mega.cli", ["train", "recipe.yaml"], nproc=2))
    assert starts_a_run(["ip", "netns", "exec", "ns0", sys.executable, "-m", "pipelines.launch", "r.yaml"])
    assert starts_a_run("torchrun --nproc-per-node 2 train.py")
    assert starts_a_run(["/opt/bin/sbatch", "job.sbatch"])
    assert not starts_a_run(["bash", "-c", "echo ${OMP_NUM_THREADS:-1}"])
    assert not starts_a_run([sys.executable, "-c", "import hrm_mega"])


def test_a_test_not_marked_slow_cannot_start_a_run() -> None:
    with pytest.raises(AssertionError, match=r"starts a run .*mark it @pytest.mark.slow"):
        subprocess.run(module_cmd("hrm_mega.cli", ["--help"]), capture_output=True)
    assert subprocess.run(["bash", "-c", "exit 3"]).returncode == 3  # other programs still run


@pytest.mark.slow
def test_a_slow_test_may_start_a_run() -> None:
    out = subprocess.run(module_cmd("hrm_mega.cli", ["--help"]), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "train" in out.stdout
