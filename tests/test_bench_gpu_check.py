"""bench/gpu_check.py, the one-shot check for a lent GPU, runs every row of its table on the CPU with --smoke (tiny
shapes, a few steps): the script is proven here, before a GPU's minutes are spent on it."""

import subprocess
import sys

from conftest import HANG, REPO

ROWS = {"1a", "1b", "2", "3", "4", "5", "6", "7", "8"}


def test_smoke_runs_every_row_and_leaves_the_real_results_alone(tmp_path):
    results = REPO / "bench" / "RESULTS-gpu.md"
    before = results.read_bytes() if results.exists() else None
    out = tmp_path / "gpu-check.md"
    ran = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=HANG)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    cells = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and " | " in line]
    statuses = {row[0].removeprefix("| "): row[2] for row in cells if row[0].removeprefix("| ") in ROWS}
    assert set(statuses) == ROWS, out.read_text()
    assert all(status in ("ok", "skipped: needs CUDA") for status in statuses.values()), statuses
    table = out.read_text()
    assert "tok/s" in table and "logits max abs err" in table and "next step's loss" in table
    assert (results.read_bytes() if results.exists() else None) == before
