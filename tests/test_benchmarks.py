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
SCRIPTS = ["overhead", "accuracy", "speedup", "critical_batch", "ddp", "advice"]


def _check_accuracy(df: pd.DataFrame) -> None:
    "Every method at every step count; per_example runs on the plain models and is refused (n/a) with BatchNorm."
    measured = df.dropna(subset=["steps"])
    assert set(measured.method) == {"fixed", "per_example", "original"}
    assert measured.median_err.notna().all() and measured.rel_std.notna().all()
    refused = df[df.steps.isna()]
    assert len(refused) == 1 and refused.note.iloc[0].startswith("n/a: BatchNorm"), refused


def _check_overhead(df: pd.DataFrame) -> None:
    "The per-example and accumulation columns next to the existing ones."
    for col in ("ours_overhead_pct", "original_overhead_pct", "per_example_overhead_pct", "per_example_extra_MB",
                "accum_overhead_pct", "accum_extra_x_params"):
        assert df[col].notna().all(), col
    assert (df.accum_buffer_x_params.round(3) == 1).all()  # one parameter-sized buffer, whatever k is


def _check_advice(df: pd.DataFrame, out: Path) -> None:
    "Three arms per problem, compared with the baseline; the interval part's coverage and auto-stop columns."
    assert (df.groupby("problem").arm.apply(set) == {"baseline", "advice", "2019"}).all()
    assert df.metric.notna().all() and (df[df.arm == "baseline"].time_ratio == 1).all()
    intervals = pd.read_csv(out / "advice_interval_summary_quick.csv")
    assert intervals.coverage.between(0, 1).all() and intervals["auto median steps"].notna().all()


CHECKS = {"accuracy": _check_accuracy, "overhead": _check_overhead}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    csv = tmp_path / f"{name}_quick.csv"
    assert csv.exists(), sorted(p.name for p in tmp_path.iterdir())
    df = pd.read_csv(csv)
    assert len(df) > 0
    assert (tmp_path / f"{name}_quick.png").exists()
    assert "|---|" in proc.stdout  # the markdown table
    if name == "advice":
        _check_advice(df, tmp_path)
    elif name in CHECKS:
        CHECKS[name](df)
