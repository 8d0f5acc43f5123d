"""Each benchmark runs end to end in `--quick` mode and writes its CSV and PNG.

Quick mode only proves the scripts work (tiny sizes, seconds each); the numbers worth reading
come from the full runs committed in benchmarks/results/.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["overhead", "accuracy", "speedup", "critical_batch"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    csv = tmp_path / f"{name}_quick.csv"
    assert csv.exists(), sorted(p.name for p in tmp_path.iterdir())
    assert len(pd.read_csv(csv)) > 0
    assert (tmp_path / f"{name}_quick.png").exists()
    assert "|---|" in proc.stdout  # the markdown table
