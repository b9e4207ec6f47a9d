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

from .report_format import _acc_by_bits, _bits_label, _is_number

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
    for name, curve in curves.items():
        # A round may end without an evaluation at the deploy width (accuracy null).
        points = [p for p in curve if _is_number(p[2])]
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        ax.plot(xs, ys, marker=".", color=colours[name], label=name)
    ax.set(
        xlabel="simulated time (s, board clock)",
        ylabel="test accuracy",
        title="Accuracy against simulated time",
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
    for name, accs in per_method.items():
        xs = [i for i, b in enumerate(widths) if _is_number(accs.get(b))]
        ys = [accs[widths[i]] for i in xs]
        ax.plot(xs, ys, marker="o", color=colours[name], label=name)
    ax.set_xticks(range(len(widths)), [_bits_label(b) for b in widths])
    ax.set(xlabel="deployed weight bits", ylabel="test accuracy", title="Accuracy by bit-width")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return None


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
