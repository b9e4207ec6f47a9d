"""The simulate report's plots: accuracy against time and bit-width, and the allocation.

Plots use matplotlib's `Figure` directly rather than pyplot: it needs no global backend switch
and keeps no figure registry, so writing a report from inside a larger process (or a test) has
no side effects. The look follows fleet/demo/report.py: same strategy colours, grid and
resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bitfleet.extras import require

from .report_format import _acc_by_bits, _acc_by_bits_ci, _bits_label, _is_number, _pair

# Colours per local strategy, as in the demo's plots; other strategies take the next spare
# colour (`_strategy_colours`) in order of first appearance.
_STRATEGY_COLOURS = {"ptq": "tab:blue", "qat": "tab:orange", "mqat": "tab:green"}

_DPI = 120


# Plots: each returns None when it wrote its file, else why it did not.


def _strategy_colours(strategies: Iterable[str]) -> dict[str, str]:
    colours = dict(_STRATEGY_COLOURS)
    spare = (
        f"tab:{c}"
        for c in ("red", "purple", "brown", "pink", "olive", "cyan", "gray")
        if f"tab:{c}" not in colours.values()
    )
    for strategy in strategies:
        if strategy not in colours:
            colours[strategy] = next(spare, "black")
    return colours


def _figure(width: float, height: float) -> Any:
    figure = require("matplotlib.figure", "plots", "the simulator's plots")
    return figure.Figure(figsize=(width, height))


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def _plot_accuracy_vs_time(
    methods: Mapping[str, Mapping], colours: Mapping[str, str], path: Path
) -> str | None:
    curves = {name: m["curve"] for name, m in methods.items() if m.get("curve")}
    if not curves:
        return "no method recorded an accuracy curve"
    fig = _figure(6, 4)
    ax = fig.subplots()
    bars = False
    for name, curve in curves.items():
        # A round may end without an evaluation at the deploy width (accuracy null).
        ci = methods[name].get("ci95")
        point_ci = ci.get("curve") if isinstance(ci, Mapping) else None
        if not isinstance(point_ci, list) or len(point_ci) != len(curve):
            point_ci = [None] * len(curve)
        points = [(p, c) for p, c in zip(curve, point_ci, strict=True) if _is_number(p[2])]
        xs, ys = [p[1] for p, _ in points], [p[2] for p, _ in points]
        yerr = _yerr(ys, [c for _, c in points])
        bars = bars or yerr is not None
        ax.errorbar(
            xs,
            ys,
            yerr=yerr,
            marker=".",
            color=colours[name],
            label=name,
            capsize=2,
            elinewidth=0.8,
        )
    ax.set(
        xlabel="simulated time (s, board clock)",
        ylabel="test accuracy",
        title="Accuracy against simulated time" + (_BARS if bars else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return None


def _plot_accuracy_vs_bits(
    methods: Mapping[str, Mapping], colours: Mapping[str, str], path: Path
) -> str | None:
    per_method = {name: _acc_by_bits(name, m) for name, m in methods.items()}
    per_method = {name: accs for name, accs in per_method.items() if accs}
    if not per_method:
        return "no method recorded accuracy by bit-width"
    # Evenly spaced categories: on a numeric axis fp32 would squeeze 2..8 bits into a corner.
    widths = sorted({b for accs in per_method.values() for b in accs})
    fig = _figure(6, 4)
    ax = fig.subplots()
    bars = False
    for k, (name, accs) in enumerate(per_method.items()):
        cis = _acc_by_bits_ci(methods[name])
        xs = [i for i, b in enumerate(widths) if _is_number(accs.get(b))]
        ys = [accs[widths[i]] for i in xs]
        yerr = _yerr(ys, [cis.get(widths[i]) for i in xs])
        bars = bars or yerr is not None
        # With error bars, methods sit side by side around each width, so bars do not overlap.
        dodge = 0.0 if yerr is None else (k - (len(per_method) - 1) / 2) * _DODGE
        ax.errorbar(
            [x + dodge for x in xs],
            ys,
            yerr=yerr,
            marker="o",
            color=colours[name],
            label=name,
            capsize=3,
            elinewidth=0.8,
        )
    ax.set_xticks(range(len(widths)), [_bits_label(b) for b in widths])
    ax.set(
        xlabel="deployed weight bits",
        ylabel="test accuracy",
        title="Accuracy by bit-width" + (_BARS if bars else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return None


_BARS = "\n(bars: 95% CI over seeds)"
_DODGE = 0.06  # of the distance between widths, between methods' bars at one width


def _yerr(ys: list[float], cis: list[Any]) -> list[list[float]] | None:
    """matplotlib's asymmetric `yerr` (distances below and above each point) from `[lo, hi]`
    intervals; None where no point has one (a single-seed run: no bars at all)."""
    pairs = [_pair(c) for c in cis]
    if not any(p is not None for p in pairs):
        return None
    below = [max(0.0, y - p[0]) if p else 0.0 for y, p in zip(ys, pairs, strict=True)]
    above = [max(0.0, p[1] - y) if p else 0.0 for y, p in zip(ys, pairs, strict=True)]
    return [below, above]


def _plot_allocation(
    methods: Mapping[str, Mapping], colours: Mapping[str, str], path: Path
) -> str | None:
    panels = {name: m for name, m in methods.items() if m.get("significance")}
    if not panels:
        return "no method recorded significance (only allocation methods do)"
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.5 * cols, 4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, m) in zip(axes, panels.items(), strict=False):
        assignment = m.get("assignment") or {}
        by_strategy: dict[str, list[tuple[float, float]]] = {}
        for device, (speed, acc) in m["significance"].items():
            by_strategy.setdefault(assignment.get(device, "unassigned"), []).append((speed, acc))
        for strategy, points in sorted(by_strategy.items()):
            ax.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                s=18,
                color=colours.get(strategy, "grey"),
                label=f"{strategy} ({len(points)})",
            )
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        ax.set(
            xlim=(-0.05, 1.05),
            ylim=(-0.05, 1.05),
            xlabel="SigSpeed",
            ylabel="SigAcc",
            title=name,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _save(fig, path)
    return None
