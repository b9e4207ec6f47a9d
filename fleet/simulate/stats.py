"""Statistics over seeds for `bitfleet simulate`: intervals for means, paired differences and
ratios of means (docs/simulation.md#statistics).

A several-seed run has few seeds (2 to 5, each a whole experiment), so the choices here are the
ones that stay honest with a handful of values:

- `mean_ci`: the Student-t interval, because with n this small the normal interval
  (mean +- 1.96 s/sqrt(n)) is far too narrow (t at 95% is 12.7 for 2 seeds, 2.78 for 5).
- `paired_diff`: the t interval of the per-seed differences, over the seeds both methods ran.
  Two methods run on the same seed share its data split, initial model and round selection,
  so much of the seed-to-seed spread is common to both; differencing seed by seed removes it,
  and the paired interval is much narrower than two separate ones would suggest.
- `bootstrap_ci`: a percentile bootstrap over seeds for statistics that are not a mean, such
  as the capture ratios (a ratio of differences of means has no t interval). Seeds are
  resampled whole, so every method inside one statistic sees the same resampled seeds and
  paired quantities stay paired. With few seeds the bootstrap has few distinct resamples
  (10 for 3 seeds) and tends to be narrow: read it as a rough spread, not an exact coverage.

numpy only: the t quantile is computed from the closed form of Student's t distribution for an
integer number of degrees of freedom (Abramowitz and Stegun 26.7.3-4), inverted by bisection,
so nothing here needs scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Interval", "bootstrap_ci", "mean_ci", "paired_diff", "t_quantile"]


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval; unpacks as `(estimate, lo, hi)`.

    `n` is the number of seeds behind it; `degenerate` flags an interval from fewer than two
    (then `lo == hi == estimate`: there is no spread to measure, not a certain value). For a
    bootstrap, `dropped` counts the resamples where the statistic was undefined, and `lo`,
    `hi` (or the `estimate` itself) are None where it was never defined.
    """

    estimate: float | None
    lo: float | None
    hi: float | None
    n: int
    dropped: int = 0
    resamples: int = 0

    def __iter__(self) -> Iterator[float | None]:
        return iter((self.estimate, self.lo, self.hi))

    @property
    def degenerate(self) -> bool:
        return self.n < 2

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None or self.hi is None else (self.hi - self.lo) / 2

    def pair(self, digits: int) -> list[float] | None:
        """`[lo, hi]` rounded for results.json, or None where there is no interval."""
        if self.lo is None or self.hi is None:
            return None
        return [round(float(self.lo), digits), round(float(self.hi), digits)]


# --- Student's t -----------------------------------------------------------------------------


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer >= 1) degrees of freedom, t >= 0.

    Abramowitz and Stegun 26.7.3 (odd df) and 26.7.4 (even df), with theta = atan(t/sqrt(df)):
    finite sums of powers of cos(theta), exact up to rounding.
    """
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(0, df - 2, 2):  # cos^0 .. cos^(df-2), coefficient (k+1)/(k+2) each step
            term *= c2 * (k + 1) / (k + 2)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, df - 2, 2):  # cos^1 .. cos^(df-2)
        term *= c2 * (k + 1) / (k + 2)
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(level: float, df: int) -> float:
    """The two-sided critical value: P(|T| < t) = level, for `df` degrees of freedom."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_central(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


# --- intervals -------------------------------------------------------------------------------


def _numbers(values: Sequence[Any]) -> list[float]:
    """The values that are numbers (a seed may have recorded None), as floats."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[Any], level: float = 0.95) -> Interval | None:
    """The mean of `values` (one per seed; None ones left out) with its Student-t interval.

    mean +- t(level, n-1) * s / sqrt(n), s the sample standard deviation (ddof=1). With one
    value the interval is the value itself, flagged `degenerate`; with none, None.
    """
    x = np.asarray(_numbers(values), dtype=float)
    n = int(x.size)
    if n == 0:
        return None
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    half = t_quantile(level, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_diff(
    a_by_seed: Mapping[Any, Any], b_by_seed: Mapping[Any, Any], level: float = 0.95
) -> Interval | None:
    """The mean of a - b over the seeds both have (matched by seed, None ones left out), with
    the paired t interval (`mean_ci` of the per-seed differences) and n, the matched seeds."""
    diffs = [
        float(a_by_seed[s]) - float(b_by_seed[s])
        for s in a_by_seed
        if s in b_by_seed and a_by_seed[s] is not None and b_by_seed[s] is not None
    ]
    return mean_ci(diffs, level)


def bootstrap_ci(
    statistic: Callable[[list[Any]], float | None],
    samples_by_seed: Mapping[Any, Any],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval | None:
    """A percentile bootstrap interval for `statistic` over seeds.

    `samples_by_seed` maps each seed to everything the statistic needs from it (for a capture,
    every method's figures on that seed); `statistic(samples)` gets a list of such samples and
    returns a number, or None where it is undefined (a ratio with a zero or negative span).
    Each resample draws len(seeds) seeds with replacement and hands the statistic their whole
    samples, so all methods inside it see the same seeds. The estimate is the statistic on
    the seeds as they are (the plug-in); resamples where it is undefined are dropped and
    counted in `dropped`. The same `seed` gives the same resamples: two statistics bootstrapped
    with the same seed over the same seeds are resampled alike.
    """
    samples = list(samples_by_seed.values())
    n = len(samples)
    if n == 0:
        return None
    estimate = _finite(statistic(samples))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    values = []
    for row in draws:
        value = _finite(statistic([samples[i] for i in row]))
        if value is not None:
            values.append(value)
    dropped = n_boot - len(values)
    if not values:
        return Interval(estimate, None, None, n, dropped, n_boot)
    alpha = 1 - level
    lo, hi = np.quantile(np.asarray(values), [alpha / 2, 1 - alpha / 2])
    return Interval(estimate, float(lo), float(hi), n, dropped, n_boot)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
