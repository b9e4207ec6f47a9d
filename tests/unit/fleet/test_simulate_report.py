"""Tests for fleet.simulate.report: report.md and plots from a simulate results dict."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fleet.simulate.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def curve(final: float, rounds: int = 5, round_s: float = 80.0) -> list[list[float]]:
    return [[r, (r + 1) * round_s, final * (r + 1) / rounds] for r in range(rounds)]


def results() -> dict:
    devices = [f"dev{i}" for i in range(12)]
    fedhq_assignment = {d: ("qat" if i % 3 == 0 else "ptq") for i, d in enumerate(devices)}
    return {
        "config": "experiments/fedhq_fmnist.toml",
        "experiment": "fedhq_fmnist",
        "quick": True,
        "seconds": 384.7,
        "time_note": "Board times are scaled from host step times (docs/simulation.md).",
        "allocation_seconds": {"coarse": 0.003, "fine": 41.2},
        "methods": {
            "FedHQ": {
                "final_acc": 0.8312,
                "final_acc_fp32": 0.8521,
                "deploy_bits": 2,
                "sim_seconds": 812.3,
                "host_seconds": 64.1,
                "rounds": 5,
                "curve": curve(0.8312),
                "assignment": fedhq_assignment,
                "rules": {
                    d: ("qat_side" if i % 3 == 0 else "ptq_side" if i < 6 else "unimportant")
                    for i, d in enumerate(devices)
                },
                "allocation_seconds": {"coarse": 0.003, "fine": 41.2},
                "acc_by_bits": {"32": 0.8521, "8": 0.85, "6": 0.849, "4": 0.845, "2": 0.8312},
                "significance": {d: [i / 11, (11 - i) / 11] for i, d in enumerate(devices)},
            },
            "FedAQT": {
                "final_acc": 0.8377,
                "final_acc_fp32": 0.8533,
                "deploy_bits": 2,
                "sim_seconds": 1333.0,
                "host_seconds": 71.9,
                "rounds": 5,
                "curve": [[1, 260.0, None], *curve(0.8377, round_s=260.0)[1:]],
                "assignment": dict.fromkeys(devices, "qat"),
                "allocation_seconds": {"coarse": 0.0, "fine": 0.0},
                "acc_by_bits": {"32": 0.8533, "8": 0.853, "4": 0.849, "2": 0.8377},
            },
            "FedRH": {
                "final_acc": 0.8101,
                "final_acc_fp32": 0.8498,
                "deploy_bits": 2,
                "sim_seconds": 1201.7,
                "host_seconds": 66.0,
                "rounds": 5,
                "curve": curve(0.8101, round_s=240.0),
                "assignment": {d: ("qat" if i % 2 else "ptq") for i, d in enumerate(devices)},
                "acc_by_bits": {"32": 0.8498, "2": 0.8101},
                "significance": {d: [0.5, 0.5] for d in devices},
            },
            "FedMPQ": {
                "final_acc": 0.8205,
                "final_acc_fp32": 0.8512,
                "deploy_bits": "per-device budget",
                "sim_seconds": 990.0,
                "host_seconds": 70.2,
                "rounds": 5,
                "curve": curve(0.8205),
                "assignment": dict.fromkeys(devices[:3], "mpq"),
                "acc_by_bits": {"32": 0.8512, "3": 0.8205},
                "device_budget": {"dev10": 4, "dev2": 2.5, "dev1": 3},
                "device_acc": {"dev10": 0.8411, "dev2": 0.7903, "dev1": 0.8107},
            },
            "FedAvg": {
                "final_acc": 0.8544,
                "final_acc_fp32": 0.8544,
                "deploy_bits": 32,
                "sim_seconds": 640.0,
                "host_seconds": 58.3,
                "rounds": 5,
                "curve": curve(0.8544),
                "acc_by_bits": {"32": 0.8544},
            },
        },
        "ablations": {
            "sigacc_without_js": {"speed_capture": 0.91, "acc_capture": 0.62},
            "xi=0.1": {"speed_capture": 0.88, "acc_capture": 0.71, "note": "band narrowed"},
        },
        "summary": {
            "fedhq_vs_aqt_speedup": 1.641,
            "best_quantized": "FedAQT",
            "FedHQ": {"speed_capture": 0.78, "acc_capture": 0.64, "sum": 1.42},
            "fedmpq": {"FedMPQ": {"mean_acc_all_devices": 0.814}},
        },
    }


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200
    assert len(data) > 5_000


def table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def section(md: str, heading: str) -> list[str]:
    """The non-blank lines under a heading, up to the next heading."""
    lines = md.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return [line for line in lines[start:end] if line]


def test_full_results_give_the_report_and_all_three_plots(tmp_path):
    written = write_report(results(), tmp_path / "out")
    out = tmp_path / "out"
    names = ["report.md", "accuracy_vs_time.png", "accuracy_vs_bits.png", "allocation.png"]
    assert written == [out / n for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for path in written[1:]:
        assert_png(path)


def test_report_tables_hold_every_method_and_its_numbers(tmp_path):
    write_report(results(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# bitfleet simulate report: fedhq_fmnist\n")
    assert "experiments/fedhq_fmnist.toml" in md
    assert "5 methods, 385 s in all (host clock)" in md
    assert "quick run" in md
    assert "Board times are scaled" in md
    # Which clock each time column shows.
    assert "*simulated s* is the simulated board clock" in md
    assert "*host s* is this host's wall clock" in md

    assert table_row(md, "FedHQ")[:8] == ["FedHQ", "2", "0.8312", "-", "0.8521", "812", "64.1", "5"]
    assert table_row(md, "FedMPQ")[1] == "per-device budget"
    fedavg = ["FedAvg", "32", "0.8544", "-", "0.8544", "640", "58.3", "5"]
    assert table_row(md, "FedAvg")[:8] == fedavg
    for name in results()["methods"]:
        assert f"| {name} |" in md

    assert "| method | fp32 | 8 | 6 | 4 | 3 | 2 |" in md


def test_accuracy_by_bits_leaves_gaps_for_widths_a_method_did_not_deploy(tmp_path):
    write_report(results(), tmp_path)
    rows = section((tmp_path / "report.md").read_text(), "## Accuracy by deployed bit-width")
    assert "| FedRH | 0.8498 | - | - | - | - | 0.8101 |" in rows
    assert "| FedAvg | 0.8544 | - | - | - | - | - |" in rows


def test_assignment_counts_overhead_devices_summary_and_ablations(tmp_path):
    write_report(results(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| method | mpq | ptq | qat | devices |" in md
    assert "| FedHQ | 0 | 8 | 4 | 12 |" in md
    assert "| FedAQT | 0 | 0 | 12 | 12 |" in md
    assert "| FedMPQ | 3 | 0 | 0 | 3 |" in md
    assert "| FedAvg | 0 |" not in md  # no assignment, no row
    assert "| method | ptq_side | qat_side | unimportant | devices |" in md
    assert "| FedHQ | 4 | 4 | 4 | 12 |" in md
    assert section(md, "## Allocation overhead, host clock") == [
        "Overall: coarse 0.003 s (0.00 min), fine 41.2 s (0.69 min).",
        "| method | coarse s | fine s |",
        "|---|---|---|",
        "| FedHQ | 0.003 | 41.2 |",  # FedAQT paid nothing and has no row
    ]

    assert section(md, "## Devices under FedMPQ") == [
        "| device | strategy | bit budget | accuracy |",
        "|---|---|---|---|",
        "| dev1 | mpq | 3 | 0.8107 |",
        "| dev2 | mpq | 2.5 | 0.7903 |",
        "| dev10 | - | 4 | 0.8411 |",
    ]

    assert section(md, "## Summary") == [
        "| name | value | speed_capture | acc_capture | sum | FedMPQ |",
        "|---|---|---|---|---|---|",
        "| fedhq_vs_aqt_speedup | 1.641 | - | - | - | - |",
        "| best_quantized | FedAQT | - | - | - | - |",
        "| FedHQ | - | 0.78 | 0.64 | 1.42 | - |",
        '| fedmpq | - | - | - | - | {"mean_acc_all_devices": 0.814} |',
    ]
    assert "| name | speed_capture | acc_capture | note |" in md
    assert "| sigacc_without_js | 0.91 | 0.62 | - |" in md
    assert "| xi=0.1 | 0.88 | 0.71 | band narrowed |" in md
    for name in ("accuracy_vs_time.png", "accuracy_vs_bits.png", "allocation.png"):
        assert f"![{name}]({name})" in md


def test_without_significance_there_is_no_allocation_plot_and_the_report_says_so(tmp_path):
    data = results()
    for method in data["methods"].values():
        method.pop("significance", None)
    written = write_report(data, tmp_path)
    assert [p.name for p in written] == [
        "report.md",
        "accuracy_vs_time.png",
        "accuracy_vs_bits.png",
    ]
    assert not (tmp_path / "allocation.png").exists()
    assert (
        "No `allocation.png`: no method recorded significance"
        in (tmp_path / "report.md").read_text()
    )


def test_a_single_allocation_method_gets_a_single_panel(tmp_path):
    data = results()
    data["methods"]["FedRH"].pop("significance")
    write_report(data, tmp_path)
    assert_png(tmp_path / "allocation.png")


def test_minimal_results_still_give_a_report(tmp_path):
    written = write_report({"methods": {"FedFQ": {"final_acc": 0.8}}}, tmp_path)
    assert written == [tmp_path / "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "Configuration not recorded; 1 method." in md
    assert table_row(md, "FedFQ") == ["FedFQ", "-", "0.8000", "-", "-", "-", "-", "-"]
    assert "No `accuracy_vs_time.png`" in md
    assert "No `accuracy_vs_bits.png`" in md
    assert "No `allocation.png`" in md
    for absent in ("## Summary", "## Ablations", "## Allocation", "## Devices under"):
        assert absent not in md


def test_the_report_is_a_function_of_the_saved_json(tmp_path):
    write_report(results(), tmp_path / "a")
    write_report(json.loads(json.dumps(results())), tmp_path / "b")
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()


def test_table_cells_are_escaped(tmp_path):
    write_report({"methods": {"FedHQ | xi=0.1": {"rounds": 3}}}, tmp_path)
    row = "| FedHQ \\| xi=0.1 | - | - | - | - | - | - | 3 |"
    assert row in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "methods"),
        ({"methods": [1, 2]}, "methods"),
        ({"methods": {"m": {"acc_by_bits": {"mixed": 0.8}}}}, "bit-width 'mixed'"),
    ],
)
def test_malformed_results_are_rejected(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        write_report(data, tmp_path)
