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

pytestmark = pytest.mark.slow  # the benchmark scripts, end to end

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["overhead", "accuracy", "speedup", "critical_batch", "ddp", "advice", "adaptive", "along_training",
           "loop_cost"]


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
    "Three arms per problem paired with the baseline, the advice's kind and steps; the interval part's columns."
    assert (df.groupby("problem").arm.apply(set) == {"baseline", "control", "advice"}).all()
    assert df.metric.notna().all() and (df[df.arm == "baseline"].time_ratio == 1).all()
    assert (df[df.arm == "baseline"].vs_baseline == 0).all() and df.steps_ratio.notna().all()
    assert df[df.arm == "advice"].kind.str.match(r"^(grow|keep|shrink|uncertain)(/|$)").all()
    intervals = pd.read_csv(out / "advice_interval_summary_quick.csv")
    assert intervals.coverage.between(0, 1).all() and intervals["auto median steps"].notna().all()


def _check_adaptive(df: pd.DataFrame) -> None:
    "Every arm on every problem, paired with the baseline; the oracle picked among the fixed sizes."
    arms = {"baseline", "control", "advice", "adaptive", "adaptdl"}
    assert (df.groupby("problem").arm.apply(lambda a: arms <= set(a))).all()
    base = df[df.arm == "baseline"]
    assert (base.time_ratio == 1).all() and (base.steps_ratio == 1).all() and (base.steps_to_target == 1).all()
    assert df.oracle.str.match(r"^(baseline|sweep_x\d+)$").all()


def _check_along_training(df: pd.DataFrame) -> None:
    "Every problem of the adaptive benchmark, each with the fixed-weight interval around its value."
    assert len(df) == 7 and df.problem.is_unique  # the quick problems, one seed
    assert (df.fixed_lo <= df.fixed).all() and (df.fixed <= df.fixed_hi).all() and (df.fixed > 0).all()
    positive = df.along > 0
    assert positive.sum() >= 3 and (df.ratio[positive] == df.along[positive] / df.fixed[positive]).all()


def _check_loop_cost(df: pd.DataFrame) -> None:
    "Every arm of both loops; the fastai callbacks' events clocked (the torch loop has none), measuring costed."
    arms = [("fastai", "plain"), ("fastai", "empty callback"), ("fastai", "AdaptiveBatchSize"), ("torch", "plain"),
            ("torch", "AdaptiveLoader")]
    assert list(zip(df.loop, df.arm)) == arms
    clocked = df[(df.loop == "fastai") & (df.arm != "plain")]
    assert (clocked.in_callback_us > 0).all() and df[df.loop == "torch"].in_callback_us.isna().all()
    assert (df[df.arm.str.startswith("Adaptive")].measuring_us > 0).all()


CHECKS = {"accuracy": _check_accuracy, "overhead": _check_overhead, "adaptive": _check_adaptive,
          "along_training": _check_along_training, "loop_cost": _check_loop_cost}


def _run_quick(name: str, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    proc = _run_quick(name, tmp_path)
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


def test_adaptive_holdout_quick(tmp_path: Path) -> None:
    "The held-out problems (never tuned on) run through every arm of the adaptive benchmark."
    proc = subprocess.run([sys.executable, str(BENCH / "adaptive.py"), "--quick", "--holdout", "--seeds", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "adaptive_holdout_quick.csv")
    _check_adaptive(df)
    assert set(df.problem) == {"char_transformer_licenses_adam", "fashion_softmax_sgd", "default_tabular_fastai",
                               "wage_tabular_fastai"}


def test_gpu_benchmark_quick(tmp_path: Path) -> None:
    """gpu.py on the CPU: every section runs (the speedup one is skipped only without Fashion-MNIST) and its
    numbers hold what they must whatever the device: at lr=0 sequential measures exactly what fixed does, a
    lower precision moves the estimate far less than sampling does, and fixed's extra memory is one
    parameter-sized buffer."""
    from benchmarks.fashion_mnist import FASHION_MNIST_DIR

    proc = _run_quick("gpu", tmp_path)
    assert "|---|" in proc.stdout
    assert (tmp_path / "gpu_quick.png").exists() and (tmp_path / "gpu_quick.md").exists()
    status = pd.read_csv(tmp_path / "gpu_status_quick.csv").set_index("section").status
    has_data = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    assert dict(status) == {"exactness": "ok", "overhead": "ok", "loop": "ok",
                            "speedup": "ok" if has_data else "skipped"}

    ex = pd.read_csv(tmp_path / "gpu_exactness_quick.csv")
    assert len(ex) == 2 * 3 * 3 and ex.estimate.notna().all(), ex[ex.estimate.isna()]
    est = ex.set_index(["problem", "precision", "method"]).estimate.unstack()
    assert (est.sequential - est.fixed).abs().max() <= 1e-9 * est.fixed.abs().max()
    assert ex[ex.precision != "fp32"].vs_fp32_pct.abs().max() < 1.0

    ov = pd.read_csv(tmp_path / "gpu_overhead_quick.csv")
    assert set(ov.model) == {"gpt", "mlp"}
    ran = ov[ov.note.isna()]
    assert ran.ms_per_step.notna().all() and ran.extra_peak_MB.notna().all()
    kinds = {"plain", "fixed", "per_example", "original", "accum_plain", "accumulated"}
    assert set(ran[ran.model == "mlp"].kind) == kinds  # no normalisation layers: per_example_ln is n/a
    assert set(ran[ran.model == "gpt"].kind) == kinds | {"per_example_ln"}
    fixed = ran[ran.kind.isin(["fixed", "accumulated"])]
    assert (fixed.extra_peak_MB / (4 * fixed.params_M)).between(0.99, 1.05).all(), fixed  # one float32 buffer

    loop = pd.read_csv(tmp_path / "gpu_loop_quick.csv")
    assert len(loop) == 3 and loop.x_plain.notna().all()
    if has_data:
        sp = pd.read_csv(tmp_path / "gpu_speedup_quick.csv")
        assert list(sp.config) == ["bs64", "advice", "advice_same_lr", "adaptive"] and sp.bs.iloc[1] > 64
        assert sp.median_steps_to_target.iloc[0] > 0 and sp.steps_vs_bs64.iloc[0] == 1  # steps counted, not only time
        adaptive = sp[sp.config == "adaptive"].iloc[0]  # no finder to charge it for
        assert adaptive.speedup_incl_finder == adaptive.speedup_vs_bs64
