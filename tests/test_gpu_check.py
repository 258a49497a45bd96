"""bench/gpu_check.py's CPU path: every check it can run here passes, and the CUDA-only ones say why not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_path(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_check.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert results["failed"] == [] and results["device"] == "CPU (no CUDA)"
    for path in ("sdpa_dense_mask", "documents", "flex_eager_forward"):  # each against the fp64 reference
        assert float(results[f"attention/{path}/float32/max_err"]) < 1e-5
    assert results["attention/flash_varlen/float32"] == "skipped: no CUDA"
    assert results["rmsnorm/apex"].startswith("skipped: ")
    assert results["train/tiny/tokens_per_s"] > 0 and results["train/tiny/losses_finite"] is True
    assert results["generate/cached_equals_uncached"] is True
    assert "all checks passed" in run.stdout
