"""A device's label distribution as a fitted rank-frequency profile, and the accuracy
significance FedHQ derives from it (docs/allocation.md#fedhq).

A device sorts its class counts in decreasing order (its rank-frequency profile) and fits that
profile to eight families: uniform, normal, exponential, power law, log-normal, gamma, Weibull,
geometric. The best fit, mapped back to the device's classes by rank, is `p_fit`: a smoothed label
distribution that gives every class some mass and stays sensible for a device with three samples
or a single class. Only these statistics (family, parameters, goodness of fit, `p_fit`, sample
count) leave the device at registration, never samples.

How a fit is judged. Each family is a curve over the ranks r = 1..K, normalised to sum to 1, so
it is a distribution over ranks; its fit is the multinomial log-likelihood of the device's
rank-sorted counts. That likelihood is chosen over a sum of squared errors because the fit feeds
a Jensen-Shannon divergence, an information measure: maximising it minimises the KL divergence
from the observed profile to the fitted one, so the fit is judged in the units it is used in. It
weights the tail (rare and absent classes) by information rather than by squared mass, which a
squared error would ignore, and unlike chi-square or KS it needs no expected count per bin and no
continuous distribution function. Families differ in free parameters (uniform none; exponential,
geometric, power law one; the others two), and the two-parameter ones can imitate the
one-parameter ones (gamma with shape 1 is exponential), so the family is chosen by BIC,
`-2 log L + k log n`: more flexibility must buy enough likelihood. `LabelFit.gof` reports the
fit itself, the KL divergence in bits from the observed to the fitted profile (0 is perfect).

Counts are smoothed before fitting with the Krichevsky-Trofimov (Jeffreys prior) estimator, half a
pseudo-count per class. Every rank then has positive weight, so a fitted curve that gives any
class zero mass has likelihood minus infinity and is never chosen; a tiny device is pulled toward
uniform in proportion to how little it has seen, and a large one is not noticeably changed.

Fitting is a likelihood maximisation over a fixed grid of each family's shape parameters,
refined once around the best coarse point, with numpy only (scipy is not a dependency): the
grid's log-curves for a number of classes K are computed once and cached (about 3 MB for
K = 10, 25 MB for K = 100), so a fit is a few matrix-vector products, about 0.2 ms for K = 10
and 0.4 ms for K = 100 on one core.

Exponential and geometric give the same curve on a normalised rank profile (the geometric is the
discretised exponential), and two-parameter families nest one-parameter ones, so which family
is named matters less than `p_fit`; with a few thousand samples and ten classes the generating
family is recovered for each of the eight (geometric as its twin, exponential).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FAMILIES",
    "FamilyFit",
    "FamilyFitter",
    "LabelFit",
    "accuracy_significance",
    "fit_label_profile",
    "js_divergence",
    "pooled_distribution",
]

#: Pseudo-count added to every class before fitting (Krichevsky-Trofimov / Jeffreys prior).
SMOOTHING = 0.5

# Log-probabilities are floored here so that exp() of the steepest candidate curves never
# underflows to 0: e^-700 is still a normal float64, so every class keeps positive mass.
_LOG_FLOOR = -700.0


@dataclass(frozen=True)
class FamilyFit:
    """One family's best curve for a profile: what a registered fitting function returns.

    `curve` is the fitted distribution over ranks 1..K (positive, sums to 1); `n_params` is the
    number of free shape parameters, which the BIC penalises.
    """

    params: dict[str, float]
    curve: np.ndarray
    n_params: int


#: A fitting function: rank-sorted (decreasing), smoothed, positive counts -> the family's fit.
FamilyFitter = Callable[[np.ndarray], FamilyFit]


def _normalise_log(log_g: np.ndarray) -> np.ndarray:
    """Turn unnormalised log-curves (rows) into floored log-probabilities over the ranks."""
    peak = log_g.max(axis=-1, keepdims=True)
    log_z = peak + np.log(np.exp(log_g - peak).sum(axis=-1, keepdims=True))
    return np.maximum(log_g - log_z, _LOG_FLOOR)


@dataclass(frozen=True)
class _Axis:
    """A shape parameter's search range; log-spaced for scales and rates, linear otherwise."""

    name: str
    bounds: Callable[[int], tuple[float, float]]  # (low, high) for K classes, in natural units
    log: bool

    def grid(self, k: int, n: int) -> np.ndarray:
        """`n` values spanning the range for K classes, in natural units."""
        return (np.geomspace if self.log else np.linspace)(*self.bounds(k), n)


@dataclass(frozen=True)
class _Table:
    """A family's cached grid for one number of classes K.

    `curves` holds the floored log-probability curves at every point of the fine grid (row-major
    over `shape`); `coarse` is the copy of every `_REFINE`-th point per axis that is searched
    first, and `coarse_rows` maps its rows back to `curves`.
    """

    shape: tuple[int, ...]
    natural: np.ndarray  # (points, axes): parameter values in natural units
    curves: np.ndarray  # (points, K)
    coarse: np.ndarray  # (coarse points, K)
    coarse_rows: np.ndarray


#: Fine-grid points per coarse step on each axis.
_REFINE = 3


class _GridFamily:
    """Fits a family with one or two shape parameters: coarse grid search, then the fine grid.

    `log_shape(r, *params)` gives the family's unnormalised log-curve at ranks `r` (shape (1, K))
    for parameter columns (shape (M, 1)); normalising over the K ranks absorbs every scale
    factor, so only shape parameters are searched. The fine grid's curves are computed once per
    K and cached, so a fit is two matrix-vector products: the coarse grid, then the fine points
    between the best coarse point's neighbours. (Building them per call instead was
    dominated by numpy call overhead, several times slower.)
    """

    def __init__(
        self, axes: Sequence[_Axis], log_shape: Callable[..., np.ndarray], coarse: int
    ) -> None:
        self.axes = tuple(axes)
        self.log_shape = log_shape
        self.coarse = coarse
        self._table = functools.lru_cache(maxsize=4)(self._build)

    def _build(self, k: int) -> _Table:
        grids = [ax.grid(k, (self.coarse - 1) * _REFINE + 1) for ax in self.axes]
        shape = tuple(len(g) for g in grids)
        natural = np.stack([m.ravel() for m in np.meshgrid(*grids, indexing="ij")], axis=1)
        ranks = np.arange(1, k + 1, dtype=np.float64)[None, :]
        curves = _normalise_log(self.log_shape(ranks, *natural.T[:, :, None]))
        coarse_rows = _rows([np.arange(0, n, _REFINE) for n in shape], shape)
        return _Table(
            shape, natural, curves, np.ascontiguousarray(curves[coarse_rows]), coarse_rows
        )

    def __call__(self, counts: np.ndarray) -> FamilyFit:
        table = self._table(len(counts))
        centre = table.coarse_rows[int(np.argmax(table.coarse @ counts))]
        # The fine points strictly between the best coarse point's neighbours, centre included,
        # so refining never makes the fit worse.
        window = [
            np.arange(max(c - _REFINE + 1, 0), min(c + _REFINE, n))
            for c, n in zip(np.unravel_index(centre, table.shape), table.shape, strict=True)
        ]
        rows = _rows(window, table.shape)
        best = rows[int(np.argmax(table.curves[rows] @ counts))]
        params = {ax.name: float(v) for ax, v in zip(self.axes, table.natural[best], strict=True)}
        return FamilyFit(params, np.exp(table.curves[best]), len(self.axes))


def _rows(indices: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Row-major flat indices of the grid points given by per-axis index arrays."""
    rows = indices[0]
    for index, n in zip(indices[1:], shape[1:], strict=True):
        rows = (rows[:, None] * n + index[None, :]).ravel()
    return rows


def _fit_uniform(counts: np.ndarray) -> FamilyFit:
    """Every rank equally likely: the profile of an IID device."""
    return FamilyFit({}, np.full(len(counts), 1.0 / len(counts)), 0)


def _scale_bounds(low: float, high_per_class: float) -> Callable[[int], tuple[float, float]]:
    """Bounds for a scale in rank units: from `low` up to `high_per_class` times K."""
    return lambda k: (low, high_per_class * max(k, 2))


_exponential = _GridFamily(
    [_Axis("rate", lambda k: (1e-3, 20.0), log=True)],
    lambda r, rate: -rate * (r - 1.0),
    coarse=200,
)


def _fit_geometric(counts: np.ndarray) -> FamilyFit:
    """Geometric, P(r) proportional to (1 - p)^(r - 1).

    On a rank profile normalised over ranks 1..K this is the same curve as the exponential
    (the geometric is the discretised exponential, p = 1 - exp(-rate)), so it reuses that fit
    and reports the discrete parameterisation. Selection keeps the earlier-registered family on
    an exact tie, so a geometric profile is labelled "exponential" unless the registry says
    otherwise.
    """
    fit = _exponential(counts)
    return FamilyFit({"p": -math.expm1(-fit.params["rate"])}, fit.curve, fit.n_params)


_power_law = _GridFamily(
    [_Axis("exponent", lambda k: (0.01, 8.0), log=True)],
    lambda r, s: -s * np.log(r),
    coarse=200,
)

_normal = _GridFamily(
    [
        _Axis("loc", lambda k: (1.0 - max(k, 2), float(max(k, 2))), log=False),
        _Axis("scale", _scale_bounds(0.2, 4.0), log=True),
    ],
    lambda r, loc, scale: -0.5 * ((r - loc) / scale) ** 2,
    coarse=28,
)

_log_normal = _GridFamily(
    [
        _Axis("mu", lambda k: (-6.0, math.log(max(k, 2)) + 1.0), log=False),
        _Axis("sigma", lambda k: (0.1, 10.0), log=True),
    ],
    lambda r, mu, sigma: -np.log(r) - 0.5 * ((np.log(r) - mu) / sigma) ** 2,
    coarse=28,
)

_gamma = _GridFamily(
    [
        _Axis("shape", lambda k: (0.02, 30.0), log=True),
        _Axis("scale", _scale_bounds(0.05, 20.0), log=True),
    ],
    lambda r, shape, scale: (shape - 1.0) * np.log(r) - r / scale,
    coarse=28,
)

_weibull = _GridFamily(
    [
        _Axis("shape", lambda k: (0.1, 10.0), log=True),
        _Axis("scale", _scale_bounds(0.1, 4.0), log=True),
    ],
    lambda r, shape, scale: (shape - 1.0) * np.log(r) - (r / scale) ** shape,
    coarse=28,
)

#: Families by name, in the order of docs/allocation.md#sigacc, which also breaks exact ties in
#: selection. Each maps rank-sorted smoothed counts to a `FamilyFit`; add or replace entries to
#: change the candidates.
FAMILIES: dict[str, FamilyFitter] = {
    "uniform": _fit_uniform,
    "normal": _normal,
    "exponential": _exponential,
    "power_law": _power_law,
    "log_normal": _log_normal,
    "gamma": _gamma,
    "weibull": _weibull,
    "geometric": _fit_geometric,
}


def _check_distribution(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    total = array.sum()
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum")
    return array / total


@dataclass(frozen=True)
class LabelFit:
    """A device's fitted label profile: everything about its labels that it shares.

    `params` are in rank units (rank 1 is the device's most frequent class); `gof` is the KL
    divergence in bits from the smoothed observed profile to the fitted one; `p_fit[c]` is the
    fitted probability of class c (positive, sums to 1).
    """

    family: str
    params: dict[str, float]
    gof: float
    p_fit: list[float]
    n_samples: int

    def to_dict(self) -> dict:
        """JSON-ready form: what the agent sends at registration."""
        return {
            "family": self.family,
            "params": dict(self.params),
            "gof": self.gof,
            "p_fit": list(self.p_fit),
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelFit:
        """Read a registration's statistics, rejecting what a faulty or hostile device could send.

        The coordinator feeds `p_fit` and `n_samples` into every device's significance, so a
        malformed entry must fail here rather than skew the allocation.
        """
        family, params = data.get("family"), data.get("params")
        n_samples, gof = data.get("n_samples"), data.get("gof")
        if not isinstance(family, str) or not isinstance(params, Mapping):
            raise ValueError("label fit needs a string 'family' and a 'params' mapping")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"label fit 'n_samples' must be a positive integer, got {n_samples!r}")
        number = (int, float)
        values = [gof, *params.values()]
        if any(isinstance(v, bool) or not isinstance(v, number) for v in values) or not all(
            math.isfinite(v) for v in values
        ):
            raise ValueError("label fit 'gof' and 'params' must be finite numbers")
        p_fit = data.get("p_fit")
        if not isinstance(p_fit, list) or any(
            isinstance(v, bool) or not isinstance(v, number) for v in p_fit
        ):
            raise ValueError("label fit 'p_fit' must be a list of numbers")
        p = _check_distribution("p_fit", p_fit)
        if abs(sum(p_fit) - 1.0) > 1e-6 or np.any(p <= 0):
            raise ValueError("label fit 'p_fit' must be positive and sum to 1")
        return cls(
            family=family,
            params={str(k): float(v) for k, v in params.items()},
            gof=float(gof),
            p_fit=[float(v) for v in p],
            n_samples=n_samples,
        )


def fit_label_profile(counts: Sequence[int]) -> LabelFit:
    """Fit a device's class counts (one per class of the task, zeros included) to `FAMILIES`.

    Zero-count classes belong in `counts`: the fitted tail is what gives them their small
    positive mass. Classes with equal counts share one probability (the mean of their ranks'
    fitted values), so the result does not depend on the order in which ties were ranked.
    """
    raw = np.asarray(counts)
    if raw.ndim != 1 or raw.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {raw.shape}")
    if not np.issubdtype(raw.dtype, np.integer) or np.any(raw < 0):
        raise ValueError("counts must be non-negative integers")
    n_samples = int(raw.sum())
    if n_samples == 0:
        raise ValueError("cannot fit a label profile to zero samples")

    order = np.argsort(-raw, kind="stable")
    ranked = raw[order].astype(np.float64) + SMOOTHING
    total = ranked.sum()
    observed = ranked / total

    fits = {name: fitter(ranked) for name, fitter in FAMILIES.items()}

    def bic(name: str) -> float:
        fit = fits[name]
        return -2.0 * float(ranked @ np.log(fit.curve)) + fit.n_params * math.log(total)

    # min() keeps the first of equal scores: on an exact tie the earlier-registered family wins.
    family = min(fits, key=bic)
    fit = fits[family]

    gof = float(observed @ (np.log2(observed) - np.log2(fit.curve)))
    _, group = np.unique(raw[order], return_inverse=True)
    shared = np.bincount(group, weights=fit.curve) / np.bincount(group)
    p_fit = np.empty(len(raw))
    p_fit[order] = shared[group]
    p_fit /= p_fit.sum()
    return LabelFit(
        family=family,
        params=fit.params,
        gof=max(gof, 0.0),
        p_fit=[float(v) for v in p_fit],
        n_samples=n_samples,
    )


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits, in [0, 1]; inputs are normalised (counts are fine).

    JS rather than KL because it is symmetric, bounded and finite when either side has zeros,
    so it can compare a device's distribution with the fleet's without any further smoothing.
    """
    a = _check_distribution("p", p)
    b = _check_distribution("q", q)
    if a.shape != b.shape:
        raise ValueError(f"p and q must have the same length, got {a.size} and {b.size}")
    m = 0.5 * (a + b)

    def kl_to_m(x: np.ndarray) -> float:
        support = x > 0
        return float(x[support] @ np.log2(x[support] / m[support]))

    return min(max(0.5 * kl_to_m(a) + 0.5 * kl_to_m(b), 0.0), 1.0)


def pooled_distribution(fits: Sequence[LabelFit]) -> list[float]:
    """The fleet's label distribution from registrations alone: `p_fit` weighted by samples.

    The coordinator never sees labels, so this sample-weighted mixture is its `p_global`.
    """
    if not fits:
        raise ValueError("need at least one label fit")
    lengths = {len(f.p_fit) for f in fits}
    if len(lengths) != 1:
        raise ValueError(f"label fits disagree on the number of classes: {sorted(lengths)}")
    weights = np.array([f.n_samples for f in fits], dtype=np.float64)
    mixture = weights @ np.array([f.p_fit for f in fits]) / weights.sum()
    return [float(v) for v in mixture]


def accuracy_significance(
    n: int,
    n_max: int,
    p_fit: Sequence[float] | np.ndarray,
    p_global: Sequence[float] | np.ndarray,
) -> float:
    """SigAcc = (n / n_max) * (1 - JS(p_fit, p_global)), in [0, 1] (docs/allocation.md#fedhq).

    Large data sets whose labels look like the fleet's drive the global model most, so
    quantization noise on those devices costs the most accuracy; the coordinator min-max
    normalises these values across the fleet before allocating.
    """
    if n_max < 1 or not 0 <= n <= n_max:
        raise ValueError(f"need 0 <= n <= n_max and n_max >= 1, got n={n}, n_max={n_max}")
    return (n / n_max) * (1.0 - js_divergence(p_fit, p_global))
