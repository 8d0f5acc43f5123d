"""Error bars for the noise scale, and the rule that ends a run once they are narrow enough.

The smoothed noise scale is a ratio of two weighted sums of the windows' raw estimates,
R = Σ w_i n_i / Σ w_i s_i (n_i the raw tr(Σ), s_i the raw |G|², w_i = decay^(k-i) the EMA's
weights; its bias correction cancels in the ratio). A naive standard error gets two things wrong:

- **the ratio.** |G|² is often barely above its own noise, so 1/S is far from linear and the
  delta method's symmetric interval is too narrow on the high side. Fieller's interval is the set
  of R for which Σ w_i (n_i − R s_i) is compatible with zero: exact for a ratio of normal means,
  asymmetric, and unbounded when |G|² is not distinguishable from zero (then no batch size is safe).
- **autocorrelation.** While training, consecutive windows share the weights' drift. Windows are
  grouped into consecutive blocks (batch means) whose sums are close to independent, and the
  spread is taken over blocks, with Student's t on the blocks' effective number.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "noise_scale_interval", "AutoStop", "LEVEL", "REL_HALFWIDTH", "MAX_AUTO_IT"]

LEVEL = 0.90  # two-sided confidence of the interval
REL_HALFWIDTH = 0.10  # num_it="auto" stops once the half-width is at most this fraction of the value
MAX_AUTO_IT = 20_000  # num_it="auto" stops here (small batches) whatever the interval says
MIN_WINDOWS = 10  # fewer windows than this give no interval: too few blocks to estimate a spread
MIN_AUTO_WINDOWS = 30  # num_it="auto" never stops before this many windows (see AutoStop)
WIDEN_TO = 2.0  # at lr=0, num_it="auto" widens windows until the big batch is at least this × the noise scale


@dataclass(frozen=True)
class Interval:
    "A confidence interval for B_simple around the smoothed value; `hi` is inf when |G|² may be zero."
    value: float
    lo: float
    hi: float
    level: float = LEVEL

    @property
    def rel_halfwidth(self) -> float:
        "Half the width relative to the value (inf when unbounded or the value is not positive)."
        if not (self.value > 0 and math.isfinite(self.hi)):
            return math.inf
        return (self.hi - self.lo) / (2 * self.value)

    def __str__(self) -> str:
        "As in '91 (80–104)'."
        hi = "∞" if math.isinf(self.hi) else _fmt(self.hi)
        return f"{_fmt(self.value)} ({_fmt(self.lo)}–{hi})"


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}"


def block_length(n: int, resid: np.ndarray) -> int:
    """Windows per block: about n^(1/3), longer when the residuals are autocorrelated, at least 5 blocks.

    Batch means underestimate the variance by about τ/L for blocks of L windows and an integrated
    autocorrelation time τ = (1 + ρ)/(1 − ρ) (ρ the lag-1 correlation of the residuals): L ≥ 5τ
    keeps that near a fifth while the t quantile pays for the fewer blocks.
    """
    length = max(1, round(n ** (1 / 3)))
    r = resid - resid.mean()
    rho = float(r[:-1] @ r[1:]) / float(r @ r) if r.any() else 0.0
    if rho > 0:
        length = max(length, math.ceil(5 * (1 + rho) / (1 - rho)))
    return min(length, max(1, n // 5))


def noise_scale_interval(noise: Sequence[float], scale: Sequence[float], decay: float,
                         level: float = LEVEL, weights: Sequence[float] | None = None) -> Interval | None:
    """A `level` confidence interval for Σ w n / Σ w s from raw window estimates, by Fieller and batch means.

    `decay` is the EMA decay per window (the estimator's `beta`); `weights` multiply the EMA's
    (the windows' small batches, when windows were widened: the estimator's weighting). None with fewer than
    `MIN_WINDOWS` finite windows. The test statistic at a candidate R is the self-normalised
    sum (Σ_b d_b)² / Σ_b d_b² of the block sums d_b = Σ_{i∈b} w_i (n_i − R s_i), which for m
    independent normal blocks is m·T²/(m−1+T²) with T Student-t on m−1 degrees of freedom.
    """
    n_raw, s_raw = np.asarray(noise, dtype=float), np.asarray(scale, dtype=float)
    sizes = np.ones_like(n_raw) if weights is None else np.asarray(weights, dtype=float)
    keep = np.isfinite(n_raw) & np.isfinite(s_raw)
    n_raw, s_raw, sizes = n_raw[keep], s_raw[keep], sizes[keep]
    k = len(n_raw)
    if k < MIN_WINDOWS:
        return None
    w = decay ** np.arange(k - 1, -1, -1, dtype=float) * sizes
    N, S = float(w @ n_raw), float(w @ s_raw)
    if not S > 0:  # the smoothed |G|² itself is not positive: no upper bound
        return Interval(N / S if S else math.nan, 0.0, math.inf, level)
    value = N / S
    starts = np.arange(0, k, block_length(k, n_raw - value * s_raw))
    nb, sb, wb = (np.add.reduceat(a, starts) for a in (w * n_raw, w * s_raw, w))
    m_eff = wb.sum() ** 2 / np.square(wb).sum()  # blocks of near-zero weight carry no information
    df = max(m_eff - 1, 1.0)
    from scipy.stats import t as student_t  # here: scipy.stats takes 0.4 s to import, a run needs it at its end

    t = float(student_t.ppf(0.5 + level / 2, df))
    c = m_eff * t * t / (m_eff - 1 + t * t) if m_eff > 1 else math.inf
    # (N − R S)² ≤ c Σ (N_b − R S_b)²  ⇔  a R² + b R + q ≤ 0
    a = S * S - c * np.dot(sb, sb)
    b = -2 * (N * S - c * np.dot(nb, sb))
    q = N * N - c * np.dot(nb, nb)
    disc = b * b - 4 * a * q
    if a > 0 and disc >= 0:
        r = math.sqrt(disc)
        lo, hi = (-b - r) / (2 * a), (-b + r) / (2 * a)
    else:  # |G|² not distinguishable from zero: the set is unbounded above
        upper_root = (-b - math.sqrt(disc)) / (2 * a) if a < 0 and disc >= 0 else -math.inf
        lo, hi = max(0.0, upper_root if upper_root <= value else 0.0), math.inf
    return Interval(float(value), float(lo), float(hi), level)


class AutoStop:
    """The `num_it="auto"` rule: stop once the 90% interval's half-width is ≤ `rel_halfwidth` of the value.

    Pass `num_it="auto"` for the defaults or `num_it=AutoStop(0.05, max_it=50_000)` to choose.
    At least `min_windows` records are needed first: with fewer blocks the interval's own width
    is too noisy, and stopping at the first lucky narrow one would bias the result. It also stops,
    with `saturated` set, once the EMA has forgotten its first windows (4/(1 − decay) records,
    weights below e⁻⁴): more windows then no longer narrow the interval, only a higher beta or a
    bigger n_batch would, and the result's verdict says so. The engine
    calls `start(decay)` (the EMA decay per record), then `update(record)` after each record and
    stops when it returns True, or after `max_it` small batches. Pure bookkeeping, no engine.

    At fixed weights (`start(decay, widen=True)`, the engine's lr=0) it also widens the windows
    (`n_batch_for`): a window of B_big = n_batch·b examples estimates |G|² with a spread that grows
    like B_simple/B_big once B_simple > B_big, so a noise scale above the big batch (Bikeshare's
    1,087 against 20 × 32 = 640) leaves every window mostly noise and ±10% out of reach. Wider
    windows cost nothing at fixed weights: each small batch is still measured once.
    """

    def __init__(self, rel_halfwidth: float = REL_HALFWIDTH, max_it: int = MAX_AUTO_IT,
                 min_windows: int = MIN_AUTO_WINDOWS, level: float = LEVEL):
        if isinstance(rel_halfwidth, bool) or not (isinstance(rel_halfwidth, (int, float)) and 0 < rel_halfwidth < 1):
            raise ValueError(f"rel_halfwidth must be in (0, 1) (0.1 stops at ±10%), got {rel_halfwidth!r}")
        if isinstance(max_it, bool) or not isinstance(max_it, int) or max_it < 1:
            raise ValueError(f"max_it must be a positive integer (the cap on small batches), got {max_it!r}")
        if isinstance(min_windows, bool) or not isinstance(min_windows, int) or min_windows < MIN_WINDOWS:
            raise ValueError(f"min_windows must be an integer >= {MIN_WINDOWS}, got {min_windows!r}")
        self.rel_halfwidth, self.max_it, self.min_windows, self.level = float(rel_halfwidth), max_it, min_windows, level
        self.start(1.0)

    @classmethod
    def of(cls, num_it) -> AutoStop | None:
        "The rule `num_it` asks for: a fresh default one for 'auto', the object itself, or None for a count."
        if isinstance(num_it, cls):
            return num_it
        return cls() if isinstance(num_it, str) and num_it == "auto" else None

    def start(self, decay: float, widen: bool = False) -> None:
        "Forget earlier records; `decay` is the EMA decay per record, `widen` allows `n_batch_for` to widen windows."
        self.decay, self.widen = decay, widen
        self.noise: list[float] = []
        self.scale: list[float] = []
        self.sizes: list[int] = []  # each record's small batches: its weight
        self.widened_to: int | None = None  # the last n_batch `n_batch_for` chose
        self._widened_at = 0
        self.interval: Interval | None = None
        self.saturated = False  # stopped because the EMA cannot average more windows, not because it is narrow
        self._next_check = self.min_windows

    def update(self, record) -> bool:
        "Add one record (anything with `noise_raw` and `scale_raw`); True when the run can stop."
        self.noise.append(record.noise_raw)
        self.scale.append(record.scale_raw)
        self.sizes.append(getattr(record, "n_batch", 1))
        if len(self.noise) < self._next_check:  # recompute as the run grows by 2%: O(k) work per check
            return False
        self._next_check = max(len(self.noise) + 1, math.ceil(1.02 * len(self.noise)))
        self.interval = noise_scale_interval(self.noise, self.scale, self.decay, self.level, self.sizes)
        if self.interval is not None and self.interval.rel_halfwidth <= self.rel_halfwidth:
            return True
        self.saturated = self.decay < 1 and len(self.noise) >= 4 / (1 - self.decay)
        return self.saturated

    def n_batch_for(self, record, n_batch: int) -> int:
        """The n_batch for the next windows: `n_batch`, or ≥ twice it while the big batch is < WIDEN_TO × noise scale.

        Decided after `min_windows` windows, then again `min_windows` windows after each widening,
        from the smoothed noise scale (an unbounded or negative one also widens); the run cannot
        stop before `min_windows` windows of the new width either, so the stop rests on them.
        Capped so that `max_it` still holds 2 × `min_windows` windows.
        """
        if not self.widen or len(self.noise) < self._widened_at + self.min_windows:
            return n_batch
        b_small = record.samples / record.iteration
        value = record.noise_scale
        want = math.ceil(WIDEN_TO * value / b_small) if value > 0 else 2 * n_batch
        cap = max(n_batch, self.max_it // (2 * self.min_windows))
        if want <= n_batch or n_batch >= cap:
            return n_batch
        self.widened_to, self._widened_at = min(max(want, 2 * n_batch), cap), len(self.noise)
        self._next_check = self._widened_at + self.min_windows
        return self.widened_to

    def __repr__(self) -> str:
        return f"AutoStop(rel_halfwidth={self.rel_halfwidth:g}, max_it={self.max_it}, min_windows={self.min_windows})"
