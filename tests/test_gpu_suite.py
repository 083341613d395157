"""``benchmarks/gpu_suite.sh --dry-run``: every step of the GPU suite runs on CPU at toy sizes and exits 0, so a
GPU's short lease is not spent on a script that rejects its own arguments."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_suite_dry_run_passes_every_step(data_dir, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "KHA_SUITE_DATA": str(data_dir)}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path / "out"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    summary = (tmp_path / "out" / "suite.txt").read_text()
    steps = re.findall(r"^(\w+): exit (\d+)", summary, flags=re.MULTILINE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [name for name, _ in steps] == ["gpu_check", "gpu_mfu", "gpu_mfu_moe", "moe_compile", "moe", "precision"]
    assert all(code == "0" for _, code in steps), summary
