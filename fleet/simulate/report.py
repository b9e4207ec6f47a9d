"""What `bitfleet simulate` leaves behind: report.md and plots built from its results.json.

The report is a pure function of the results dict, so it can be rebuilt from a saved results.json
without rerunning anything, and the simulator and its report can change apart. Every time column
names its clock (docs/simulation.md#the-board-clock): *simulated* seconds are the board clock the
simulator reconstructs (each round lasts as long as its slowest participant or the deadline, at each
profile's speed, plus link time); *host* seconds are this machine's wall clock. The tables are built
here, their cells in `report_format`, the plots in `plots`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .plots import (
    _plot_accuracy_vs_bits,
    _plot_accuracy_vs_time,
    _plot_allocation,
    _strategy_colours,
)
from .report_format import (
    _acc_by_bits,
    _accuracy,
    _bits_label,
    _cell,
    _is_number,
    _natural_key,
    _number,
    _seconds,
    _value,
)

__all__ = ["write_report"]


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
        "docs/simulation.md#the-board-clock); *host s* is this host's wall clock for the same "
        "work.",
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

    docs/allocation.md#fine-stage asks for the fine stage's overhead in minutes beside the
    coarse stage's.
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
