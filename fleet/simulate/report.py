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
    _acc_by_bits_ci,
    _accuracy,
    _bits_label,
    _bracketed,
    _cell,
    _is_number,
    _natural_key,
    _number,
    _plus_minus,
    _seconds,
    _signed_accuracy,
    _signed_number,
    _signed_seconds,
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
        if any(isinstance(m.get("ci95"), Mapping) for m in methods.values()):
            intro += (
                "; `± h` is the half-width of its 95% Student-t interval over the seeds, "
                "`[lo, hi]` a 95% interval (docs/simulation.md#statistics)"
            )
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
    lines += _paired_table(results.get("paired"))
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
        "Accuracies are on the test split; *validation acc* is the same deployed model on the "
        "validation split carved from the training images, the figure to choose a variant by "
        "(docs/round.md#validation).",
        "",
        "| method | deploy bits | acc at deploy bits | validation acc | fp32 acc | simulated s "
        "| host s | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        ci = m.get("ci95") if isinstance(m.get("ci95"), Mapping) else {}
        cells = [
            _cell(name),
            _number(m.get("deploy_bits")),
            _plus_minus(m.get("final_acc"), ci.get("final_acc"), _accuracy),
            _plus_minus(m.get("final_val_acc"), ci.get("final_val_acc"), _accuracy),
            _plus_minus(m.get("final_acc_fp32"), ci.get("final_acc_fp32"), _accuracy),
            _plus_minus(m.get("sim_seconds"), ci.get("sim_seconds"), _seconds),
            _plus_minus(m.get("host_seconds"), ci.get("host_seconds"), _seconds),
            _number(m.get("rounds")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired_table(paired: Any) -> list[str]:
    """Paired differences over seeds (results.json `paired`): one row per method and
    reference, then FedHQ's capture sum against random hybrid's."""
    if not isinstance(paired, Mapping):
        return []
    rows = paired.get("differences") if isinstance(paired.get("differences"), Mapping) else {}
    lines = [
        "",
        "## Paired differences over seeds",
        "",
        "Method minus reference, seed by seed, averaged over the n seeds both ran, with the "
        "95% paired t interval: an interval that leaves out 0 is a difference the seeds agree "
        "on; negative simulated seconds are time saved.",
        "",
        "| method - reference | n | acc at deploy bits | simulated s |",
        "|---|---|---|---|",
    ]
    for key, row in rows.items():
        if not isinstance(row, Mapping):
            continue
        acc, sim = row.get("final_acc") or {}, row.get("sim_seconds") or {}
        n = acc.get("n", sim.get("n"))
        lines.append(
            f"| {_cell(key)} | {_number(n)} | "
            f"{_bracketed(acc.get('diff'), acc.get('ci95'), _signed_accuracy)} | "
            f"{_bracketed(sim.get('diff'), sim.get('ci95'), _signed_seconds)} |"
        )
    cap = paired.get("capture_sum")
    if isinstance(cap, Mapping):
        lines += [
            "",
            f"Capture sum, {_cell(cap.get('method'))} minus {_cell(cap.get('reference'))}: "
            f"{_bracketed(cap.get('diff'), cap.get('ci95'), _signed_number)} (bootstrap over "
            f"{_number(cap.get('n'))} seeds, paired: the same resampled seeds for both; "
            f"{_number(cap.get('bootstrap_dropped'))} resamples dropped as undefined). "
            f"{_cell(cap.get('verdict', ''))}.",
        ]
    figures = paired.get("figures")
    if isinstance(figures, Mapping) and figures:
        lines += [
            "",
            "The papers' figures, paired the same way (FedMPQ's mean accuracies per device "
            "group, MQAT against float training at the narrowest widths):",
            "",
            "| method - reference: figure | n | difference |",
            "|---|---|---|",
        ]
        for key, row in figures.items():
            if isinstance(row, Mapping):
                lines.append(
                    f"| {_cell(key)} | {_number(row.get('n'))} | "
                    f"{_bracketed(row.get('diff'), row.get('ci95'), _signed_accuracy)} |"
                )
    return lines if rows or isinstance(cap, Mapping) or figures else []


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
            cis = _acc_by_bits_ci(methods[name])
            cells = [_plus_minus(accs.get(b), cis.get(b), _accuracy) for b in widths]
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
        fields = row if isinstance(row, Mapping) else ["value"]
        columns.update(dict.fromkeys(c for c in fields if c not in _BESIDE))
    dropped = any(
        isinstance(row, Mapping) and "bootstrap_dropped" in row for row in section.values()
    )
    lines = [
        "| name | "
        + " | ".join([*(_cell(c) for c in columns), *(["dropped resamples"] if dropped else [])])
        + " |",
        "|---|" + "---|" * (len(columns) + dropped),
    ]
    for key, row in section.items():
        fields = row if isinstance(row, Mapping) else {"value": row}
        cells = [_field(fields, c) if c in fields else "-" for c in columns]
        if dropped:
            cells.append(_dropped(fields.get("bootstrap_dropped")))
        lines.append(f"| {_cell(key)} | " + " | ".join(cells) + " |")
    return lines


#: Keys that qualify a row's figures rather than being figures: shown with them, or (by_seed)
#: left to each seed's own report.
_BESIDE = ("ci95", "ci95_single_seed", "bootstrap_dropped", "by_seed")


def _field(fields: Mapping[str, Any], column: str) -> str:
    """One figure of a row, with its interval `[lo, hi]` where the row's `ci95` has one."""
    value, ci = fields[column], fields.get("ci95")
    if isinstance(ci, Mapping) and _is_number(value) and column in ci:
        fmt = _seconds if column.endswith("seconds") else _accuracy
        return _cell(_bracketed(value, ci[column], fmt))
    if isinstance(value, Mapping) and isinstance(value.get("ci95"), Mapping):
        # A nested row with intervals (summary.fedmpq.<method>): its figures in one cell.
        return _cell(", ".join(f"{k} {_field(value, k)}" for k in value if k not in _BESIDE))
    return _cell(_value(value))


def _dropped(counts: Any) -> str:
    """Bootstrap resamples dropped per figure, only those that dropped any ("0": none did)."""
    if not isinstance(counts, Mapping):
        return "-" if counts is None else _number(counts)
    some = [f"{_cell(k)} {_number(v)}" for k, v in counts.items() if v]
    return ", ".join(some) if some else "0"
