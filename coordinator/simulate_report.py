"""What `bitfleet simulate` leaves behind: report.md and plots built from its results.json.

The report is a pure function of the results dict, so it can be rebuilt from a saved
results.json without rerunning anything, and the simulator and its report can change apart.
Every time column names its clock (DESIGN section 5): *simulated* seconds are the board clock
the simulator reconstructs (each round lasts as long as its slowest participant or the
deadline, at each profile's speed, plus link time); *host* seconds are this machine's wall clock.

Plots use matplotlib's `Figure` directly rather than pyplot: it needs no global backend switch
and keeps no figure registry, so writing a report from inside a larger process (or a test) has
no side effects. The look follows coordinator/demo_report.py: same strategy colours, grid and
resolution.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

# Colours per local strategy, as in the demo's plots; other strategies take the next spare
# colour (`_strategy_colours`) in order of first appearance.
_STRATEGY_COLOURS = {"ptq": "tab:blue", "qat": "tab:orange", "mqat": "tab:green"}

_DPI = 120
_FLOAT_BITS = 32.0


def write_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write report.md and the plots for a simulate run into `out_dir`; return their paths.

    Only `methods` is required; every other key (and every optional per-method key) just adds
    its table or plot when present. A plot with nothing to draw is left out, and report.md says
    so, rather than leaving an empty image that looks like a result.
    """
    methods = results.get("methods")
    if not isinstance(methods, Mapping):
        raise ValueError("results need a 'methods' mapping of method name -> results")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    strategy_colours = _strategy_colours(
        s for m in methods.values() for s in (m.get("assignment") or {}).values()
    )
    # One colour per method across plots, even where a method is missing from one of them.
    method_colours = {name: f"C{i % 10}" for i, name in enumerate(methods)}
    plots = {
        "accuracy_vs_time.png": _plot_accuracy_vs_time(
            methods, method_colours, out_dir / "accuracy_vs_time.png"
        ),
        "accuracy_vs_bits.png": _plot_accuracy_vs_bits(
            methods, method_colours, out_dir / "accuracy_vs_bits.png"
        ),
        "allocation.png": _plot_allocation(methods, strategy_colours, out_dir / "allocation.png"),
    }
    report = out_dir / "report.md"
    report.write_text(_markdown(results, methods, plots))
    return [report, *(out_dir / name for name, why_not in plots.items() if why_not is None)]


# ---------------------------------------------------------------------------------------------
# report.md


def _markdown(
    results: Mapping[str, Any], methods: Mapping[str, Mapping], plots: Mapping[str, str | None]
) -> str:
    config, experiment = results.get("config"), results.get("experiment")
    intro = f"Configuration `{config}`" if config else "Configuration not recorded"
    if results.get("quick"):
        intro += " (quick run: the experiment's `[simulate.quick]` settings, fewer rounds)"
    intro += f"; {len(methods)} method{'s' if len(methods) != 1 else ''}"
    if results.get("seeds"):
        seeds = ", ".join(str(s) for s in results["seeds"])
        intro += f"; every figure is the mean over seeds {seeds} (each seed in `seed-N/`)"
    elif results.get("seed") is not None:
        intro += f"; seed {results['seed']}"
    if _is_number(results.get("seconds")):
        intro += f", {_seconds(results['seconds'])} s in all (host clock)"
    lines = [
        f"# bitfleet simulate report: {experiment}" if experiment else "# bitfleet simulate report",
        "",
        intro + ".",
        "",
        "Clocks: *simulated s* is the simulated board clock (each round lasts as long as its "
        "slowest participant or the deadline, at each board profile's speed, plus link time; "
        "DESIGN section 5); *host s* is this host's wall clock for the same work.",
    ]
    if results.get("time_note"):
        lines += ["", str(results["time_note"])]
    lines += _methods_table(methods)
    lines += _bits_table(methods)
    lines += _count_table(
        "Allocation: devices per local strategy", "devices", methods, "assignment"
    )
    lines += _count_table("Allocation: devices per coarse-stage rule", "devices", methods, "rules")
    lines += _overhead(methods, results.get("allocation_seconds"))
    lines += _device_tables(methods)
    for title, section in (
        ("Summary", results.get("summary")),
        ("Ablations", results.get("ablations")),
    ):
        if section:
            lines += ["", f"## {title}", ""] + _mapping_table(section)
    lines += ["", "## Plots", ""]
    for name, why_not in plots.items():
        lines.append(f"![{name}]({name})" if why_not is None else f"No `{name}`: {why_not}.")
        lines.append("")
    return "\n".join(lines)


def _methods_table(methods: Mapping[str, Mapping]) -> list[str]:
    lines = [
        "",
        "## Methods",
        "",
        "| method | deploy bits | acc at deploy bits | fp32 acc | simulated s | host s | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        cells = [
            _cell(name),
            _number(m.get("deploy_bits")),
            _accuracy(m.get("final_acc")),
            _accuracy(m.get("final_acc_fp32")),
            _seconds(m.get("sim_seconds")),
            _seconds(m.get("host_seconds")),
            _number(m.get("rounds")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _bits_table(methods: Mapping[str, Mapping]) -> list[str]:
    per_method = {name: _acc_by_bits(name, m) for name, m in methods.items()}
    widths = sorted({b for accs in per_method.values() for b in accs}, reverse=True)
    if not widths:
        return []
    lines = [
        "",
        "## Accuracy by deployed bit-width",
        "",
        "| method | " + " | ".join(_bits_label(b) for b in widths) + " |",
        "|---|" + "---|" * len(widths),
    ]
    for name, accs in per_method.items():
        if accs:
            cells = [_accuracy(accs.get(b)) for b in widths]
            lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return lines


def _count_table(title: str, total: str, methods: Mapping[str, Mapping], key: str) -> list[str]:
    """How many devices each method put under each label of `key` (device -> label)."""
    counts = {name: Counter(m[key].values()) for name, m in methods.items() if m.get(key)}
    if not counts:
        return []
    labels = sorted({label for c in counts.values() for label in c})
    lines = [
        "",
        f"## {title}",
        "",
        "| method | " + " | ".join(_cell(label) for label in labels) + f" | {total} |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for name, c in counts.items():
        cells = [str(c.get(label, 0)) for label in labels]
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + f" | {c.total()} |")
    return lines


def _overhead(methods: Mapping[str, Mapping], overall: Any) -> list[str]:
    """The allocation stages' cost on the host clock, overall and per method that paid any.

    DESIGN section 4 asks for the fine stage's overhead in minutes beside the coarse stage's.
    """
    per_method = {
        name: m["allocation_seconds"]
        for name, m in methods.items()
        if isinstance(m.get("allocation_seconds"), Mapping)
        and any(_is_number(v) and v > 0 for v in m["allocation_seconds"].values())
    }
    lines: list[str] = []
    if isinstance(overall, Mapping) and overall:
        stages = ", ".join(
            f"{stage} {_seconds(s)} s ({s / 60:.2f} min)"
            if _is_number(s)
            else f"{stage} {_value(s)}"
            for stage, s in overall.items()
        )
        lines += ["", f"Overall: {stages}."]
    if per_method:
        stages = list(dict.fromkeys(stage for m in per_method.values() for stage in m))
        lines += [
            "",
            "| method | " + " | ".join(f"{_cell(stage)} s" for stage in stages) + " |",
            "|---|" + "---|" * len(stages),
        ]
        for name, m in per_method.items():
            cells = [_seconds(m.get(stage)) for stage in stages]
            lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return ["", "## Allocation overhead, host clock", *lines] if lines else []


def _device_tables(methods: Mapping[str, Mapping]) -> list[str]:
    lines: list[str] = []
    for name, m in methods.items():
        budget, acc = m.get("device_budget") or {}, m.get("device_acc") or {}
        if not budget and not acc:
            continue
        assignment = m.get("assignment") or {}
        lines += [
            "",
            f"## Devices under {_cell(name)}",
            "",
            "| device | strategy | bit budget | accuracy |",
            "|---|---|---|---|",
        ]
        for device in sorted({*budget, *acc}, key=_natural_key):
            lines.append(
                f"| {_cell(device)} | {_cell(assignment.get(device, '-'))} | "
                f"{_number(budget.get(device))} | {_accuracy(acc.get(device))} |"
            )
    return lines


def _mapping_table(section: Any) -> list[str]:
    """A free-form mapping as a table: one row per entry, one column per field of the rows.

    Rows that are mappings themselves (ablations: name -> figures) spread over columns; any
    other value sits in a single `value` column, nested structures written as JSON.
    """
    if not isinstance(section, Mapping):
        return [_cell(_value(section))]
    columns: dict[str, None] = {}
    for row in section.values():
        columns.update(dict.fromkeys(row if isinstance(row, Mapping) else ["value"]))
    lines = [
        "| name | " + " | ".join(_cell(c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, row in section.items():
        fields = row if isinstance(row, Mapping) else {"value": row}
        cells = [_cell(_value(fields[c])) if c in fields else "-" for c in columns]
        lines.append(f"| {_cell(key)} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------
# Formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> str:
    """Integers as they are, floats to four significant figures (no exponent below 10^4)."""
    if value is None:
        return "-"
    if not _is_number(value):
        return _cell(_value(value))
    if isinstance(value, int) or (
        math.isfinite(value) and value == int(value) and abs(value) < 1e15
    ):
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _accuracy(value: Any) -> str:
    return f"{value:.4f}" if _is_number(value) else _number(value)


def _seconds(value: Any) -> str:
    """Seconds with precision that suits their size: 812 s, 41.2 s, 0.003 s."""
    if not _is_number(value):
        return _number(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def _value(value: Any) -> str:
    if _is_number(value) or value is None:
        return _number(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _natural_key(name: str) -> list:
    """dev2 before dev10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def _acc_by_bits(name: str, method: Mapping) -> dict[float, Any]:
    """A method's accuracy per bit-width, with the JSON's string keys as numbers."""
    out = {}
    for key, acc in (method.get("acc_by_bits") or {}).items():
        try:
            out[float(key)] = acc
        except ValueError:
            raise ValueError(f"method {name!r}: bit-width {key!r} is not a number") from None
    return out


def _bits_label(bits: float) -> str:
    return "fp32" if bits == _FLOAT_BITS else _number(bits)


# ---------------------------------------------------------------------------------------------
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
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


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
