"""Tests for fleet.simulate.stats and the statistics over seeds in results.json and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fleet.simulate.experiment import SimDevice
from fleet.simulate.report import _paired_table, write_report
from fleet.simulate.results import _capture, _paired_figures, _with_sum, _write, _write_mean
from fleet.simulate.stats import bootstrap_ci, mean_ci, paired_diff, t_quantile

# --- the statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "t"),
    # Two-sided 95% critical values from any t table (and 99% for df 4).
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1000, 1.9623)],
)
def test_t_quantile_matches_the_table(df, t):
    assert t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)


def test_t_quantile_at_another_level():
    assert t_quantile(0.99, 4) == pytest.approx(4.6041, abs=1e-4)


def test_mean_ci_is_the_student_t_interval():
    # By hand: mean 3, s = sqrt(2.5), se = s / sqrt(5) = 0.70711, t(0.975, 4) = 2.77645,
    # half-width 1.96324.
    mean, lo, hi = mean_ci([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert lo == pytest.approx(3 - 1.96324, abs=1e-5)
    assert hi == pytest.approx(3 + 1.96324, abs=1e-5)
    ci = mean_ci([0.80, 0.82])  # mean 0.81, s = 0.014142, se = 0.01, t(0.975, 1) = 12.7062
    assert (ci.lo, ci.hi) == pytest.approx((0.81 - 0.127062, 0.81 + 0.127062), abs=1e-6)
    assert ci.n == 2 and not ci.degenerate
    assert ci.half_width == pytest.approx(0.127062, abs=1e-6)


def test_mean_ci_of_one_value_is_the_value_flagged_and_of_none_is_none():
    ci = mean_ci([0.8, None])
    assert tuple(ci) == (0.8, 0.8, 0.8)
    assert ci.n == 1 and ci.degenerate
    assert mean_ci([]) is None
    assert mean_ci([None]) is None


def test_mean_ci_is_narrower_at_a_lower_level():
    wide, narrow = mean_ci([1, 2, 4], 0.95), mean_ci([1, 2, 4], 0.5)
    assert narrow.lo > wide.lo and narrow.hi < wide.hi


def test_paired_diff_uses_only_the_seeds_both_have():
    a = {0: 0.70, 1: 0.82, 2: 0.91, 3: 0.50}  # seed 3 only in a
    b = {0: 0.68, 1: 0.81, 2: 0.88, 4: 0.99, 5: 0.7}  # seed 4 only in b
    b[5] = None
    a[5] = 0.9  # seed 5: b recorded nothing
    d = paired_diff(a, b)
    assert d.n == 3
    diffs = [0.02, 0.01, 0.03]
    assert d.estimate == pytest.approx(0.02)
    expected = mean_ci(diffs)
    assert (d.lo, d.hi) == pytest.approx((expected.lo, expected.hi))
    # Pairing removes what the seeds share: the paired interval is narrower than apart.
    assert d.half_width < mean_ci([a[s] for s in (0, 1, 2)]).half_width
    assert paired_diff({0: 1.0}, {1: 1.0}) is None


def test_paired_diff_matches_by_seed_not_by_order():
    d = paired_diff({0: 1.0, 1: 2.0}, {1: 1.5, 0: 0.5})
    assert d.estimate == pytest.approx(0.5) and d.lo == pytest.approx(0.5)


def mean_of(samples: list[float]) -> float:
    return sum(samples) / len(samples)


def test_bootstrap_interval_holds_the_plug_in_and_is_reproducible():
    samples = {s: v for s, v in enumerate([0.71, 0.74, 0.69, 0.80, 0.75, 0.72])}
    ci = bootstrap_ci(mean_of, samples, n_boot=500, seed=3)
    assert ci.estimate == pytest.approx(mean_of(list(samples.values())))
    assert ci.lo < ci.estimate < ci.hi
    assert ci.n == 6 and ci.dropped == 0 and ci.resamples == 500
    assert bootstrap_ci(mean_of, samples, n_boot=500, seed=3) == ci
    assert bootstrap_ci(mean_of, samples, n_boot=500, seed=4) != ci
    # Every resample is a mean of the seeds' values: the interval stays inside their range.
    assert min(samples.values()) <= ci.lo and ci.hi <= max(samples.values())


def test_bootstrap_resamples_whole_seeds_so_pairs_stay_paired():
    # a and b differ by exactly 0.1 on every seed, whatever the seed's own level: resampling
    # seeds (not a's and b's values apart) leaves the difference 0.1 in every resample.
    samples = {s: {"a": level + 0.1, "b": level} for s, level in enumerate([0.2, 0.5, 0.9])}

    def diff(ss: list[dict]) -> float:
        return mean_of([s["a"] for s in ss]) - mean_of([s["b"] for s in ss])

    ci = bootstrap_ci(diff, samples, n_boot=200)
    assert (ci.estimate, ci.lo, ci.hi) == pytest.approx((0.1, 0.1, 0.1))


def test_bootstrap_drops_and_counts_undefined_resamples():
    # The ratio of means is undefined (zero denominator) on every resample of seed 1 alone.
    samples = {0: (1.0, 2.0), 1: (1.0, 0.0), 2: (3.0, 1.0)}

    def ratio(ss: list[tuple[float, float]]) -> float | None:
        den = sum(s[1] for s in ss)
        return None if den == 0 else sum(s[0] for s in ss) / den

    ci = bootstrap_ci(ratio, samples, n_boot=2000, seed=0)
    assert ci.estimate == pytest.approx(5 / 3)
    # P(all three draws are seed 1) = 1/27: about 74 of 2000.
    assert 40 < ci.dropped < 110
    assert ci.lo is not None and ci.lo < ci.estimate < ci.hi
    never = bootstrap_ci(lambda ss: None, samples, n_boot=50)
    assert never.dropped == 50 and never.estimate is None and never.pair(4) is None
    assert bootstrap_ci(mean_of, {}) is None


def test_bootstrap_of_one_seed_is_degenerate():
    ci = bootstrap_ci(mean_of, {7: 0.8}, n_boot=20)
    assert tuple(ci) == (0.8, 0.8, 0.8) and ci.degenerate


# --- results.json over several seeds -------------------------------------------------------------

DEVICES = [SimDevice("dev0-rpi4", "rpi4", 2), SimDevice("dev1-rpi5", "rpi5", 4)]

#: Per method: accuracy at deploy bits and simulated seconds on seed 0; each seed shifts every
#: method alike (SHIFT) and each method a little on its own (JITTER, scaled by its position).
BASE = {
    "fedhq": (0.795, 85.0),
    "all_qat": (0.800, 120.0),
    "all_ptq": (0.770, 80.0),
    "random_hybrid": (0.785, 100.0),
    "fp32": (0.810, 60.0),
}
SHIFT = {0: (0.0, 0.0), 1: (0.010, 10.0), 2: (-0.010, -5.0)}
JITTER = {0: 0.002, 1: -0.001, 2: -0.001}
SEEDS = (0, 1, 2)


def experiment(seed: int | None = None) -> Any:
    base = {} if seed is None else {"job": {"seed": seed}}
    return SimpleNamespace(path="experiments/x.toml", name="x", devices=DEVICES, base=base)


def method(acc: float, sim: float, rounds: int = 3) -> dict[str, Any]:
    """A method's entry as `_method_results` writes it."""
    acc, fp32 = round(acc, 4), round(acc + 0.02, 4)
    return {
        "final_acc": acc,
        "final_acc_fp32": fp32,
        "deploy_bits": 2,
        "sim_seconds": round(sim, 2),
        "host_seconds": round(sim / 10, 2),
        "rounds": rounds,
        "curve": [
            [r + 1, round(sim * (r + 1) / rounds, 2), round(acc * (r + 1) / rounds, 4)]
            for r in range(rounds)
        ],
        "assignment": {d.id: "qat" for d in DEVICES},
        "acc_by_bits": {"32": fp32, "4": round(acc + 0.01, 4), "2": acc},
        "allocation_seconds": {"coarse": 0.001, "fine": 0.0},
    }


def seed_results(tmp: Path, seed: int) -> dict[str, Any]:
    """One seed's results.json, as `_write` saves it in `seed-N/`."""
    d_acc, d_sim = SHIFT[seed]
    methods = {}
    for k, (name, (acc, sim)) in enumerate(BASE.items()):
        jitter = JITTER[seed] * (k + 1)
        methods[name] = method(acc + d_acc + jitter, sim + d_sim + 100 * jitter)
    fedmpq = method(0.79 + d_acc, 90.0 + d_sim)
    fedmpq["device_budget"] = {"dev0-rpi4": 2, "dev1-rpi5": 4}
    fedmpq["device_acc"] = {"dev0-rpi4": round(0.75 + d_acc, 4), "dev1-rpi5": 0.83}
    methods["fedmpq"] = fedmpq
    ablation: dict[str, Any] = {
        "allocation": {"xi": 0.1},
        "assignment": methods["fedhq"]["assignment"],
        "final_acc": round(0.79 + d_acc, 4),
        "sim_seconds": round(90.0 + d_sim, 2),
        "qat_devices": 2,
        "acc_by_bits": methods["fedhq"]["acc_by_bits"],
    }
    ablation.update(_with_sum(_capture({**methods, "xi=0.1": ablation}, "xi=0.1")))
    out = tmp / f"seed-{seed}"
    out.mkdir(parents=True)
    return _write(out, experiment(seed), True, methods, {"xi=0.1": ablation}, 0.0)


@pytest.fixture(scope="module")
def several(tmp_path_factory) -> tuple[Path, dict[int, dict], dict[str, Any]]:
    """Three seeds' results and the several-seed results.json `_write_mean` made of them."""
    tmp = tmp_path_factory.mktemp("seeds")
    per_seed = {s: seed_results(tmp, s) for s in SEEDS}
    _write_mean(tmp, experiment(), True, per_seed, 0.0)
    return tmp, per_seed, json.loads((tmp / "results.json").read_text())


def by_seed(per_seed: dict[int, dict], name: str, key: str) -> list[float]:
    return [per_seed[s]["methods"][name][key] for s in SEEDS]


def test_write_mean_keeps_the_means_and_adds_t_intervals(several):
    _, per_seed, results = several
    assert results["seeds"] == [0, 1, 2]
    assert results["statistics"]["bootstrap_resamples"] == 2000
    fedhq = results["methods"]["fedhq"]
    # The means are where they were, in the same shapes.
    assert fedhq["final_acc"] == pytest.approx(sum(by_seed(per_seed, "fedhq", "final_acc")) / 3)
    assert set(fedhq["acc_by_bits"]) == {"32", "4", "2"}
    ci = fedhq["ci95"]
    assert set(ci) == {
        "final_acc",
        "final_acc_fp32",
        "sim_seconds",
        "host_seconds",
        "acc_by_bits",
        "curve",
    }
    for key, digits in (("final_acc", 4), ("sim_seconds", 2)):
        expected = mean_ci(by_seed(per_seed, "fedhq", key))
        assert ci[key] == [round(expected.lo, digits), round(expected.hi, digits)]
        assert ci[key][0] < fedhq[key] < ci[key][1]
    acc2 = mean_ci([per_seed[s]["methods"]["fedhq"]["acc_by_bits"]["2"] for s in SEEDS])
    assert ci["acc_by_bits"]["2"] == [round(acc2.lo, 4), round(acc2.hi, 4)]
    assert set(ci["acc_by_bits"]) == set(fedhq["acc_by_bits"])
    assert len(ci["curve"]) == len(fedhq["curve"]) == 3
    assert "ci95_single_seed" not in fedhq
    assert set(results["ablations"]["xi=0.1"]["ci95"]) >= {"final_acc", "sim_seconds"}


def test_write_mean_gives_captures_bootstrap_intervals(several):
    _, _, results = several
    for name in ("fedhq", "random_hybrid"):
        cap = results["summary"][name]
        assert set(cap["ci95"]) == {"speed_capture", "acc_capture", "sum"}
        assert cap["bootstrap_dropped"] == {"speed_capture": 0, "acc_capture": 0, "sum": 0}
        for part in ("speed_capture", "acc_capture", "sum"):
            lo, hi = cap["ci95"][part]
            assert lo <= cap[part] <= hi
    # The captures are still those of the means.
    q, p, f = (results["methods"][n] for n in ("all_qat", "all_ptq", "fedhq"))
    speed = (q["sim_seconds"] - f["sim_seconds"]) / (q["sim_seconds"] - p["sim_seconds"])
    assert results["summary"]["fedhq"]["speed_capture"] == pytest.approx(speed, abs=1e-4)
    ablation = results["ablations"]["xi=0.1"]
    assert {"speed_capture", "acc_capture", "sum"} <= set(ablation["ci95"])
    assert ablation["bootstrap_dropped"]["sum"] == 0
    fedmpq = results["summary"]["fedmpq"]["fedmpq"]
    assert fedmpq["mean_acc_lowest_budget_devices"] == pytest.approx(0.75)
    lo, hi = fedmpq["ci95"]["mean_acc_lowest_budget_devices"]
    assert lo < 0.75 < hi


def test_write_mean_pairs_every_method_with_each_reference_once(several):
    _, per_seed, results = several
    diffs = results["paired"]["differences"]
    assert "fedhq - all_qat" in diffs and "all_ptq - all_qat" in diffs
    assert "all_qat - all_ptq" not in diffs  # each unordered pair once
    assert {"fedhq - fp32", "fedhq - random_hybrid", "fedmpq - fedhq"} <= set(diffs)
    assert len(diffs) == 15  # 6 methods: every pair has a reference in it
    row = diffs["fedhq - all_qat"]
    assert (row["method"], row["reference"]) == ("fedhq", "all_qat")
    a, b = by_seed(per_seed, "fedhq", "sim_seconds"), by_seed(per_seed, "all_qat", "sim_seconds")
    expected = paired_diff(dict(enumerate(a)), dict(enumerate(b)))
    assert row["sim_seconds"]["diff"] == pytest.approx(expected.estimate, abs=0.01)
    assert row["sim_seconds"]["ci95"] == expected.pair(2)
    assert row["sim_seconds"]["n"] == row["final_acc"]["n"] == 3
    assert row["sim_seconds"]["ci95"][1] < 0  # FedHQ is faster than all-QAT on every seed

    cap = results["paired"]["capture_sum"]
    summary = results["summary"]
    assert cap["diff"] == pytest.approx(
        summary["fedhq"]["sum"] - summary["random_hybrid"]["sum"], abs=1e-3
    )
    assert cap["ci95"][0] > 0 and cap["n"] == 3 and cap["bootstrap_dropped"] == 0
    assert cap["verdict"] == (
        "FedHQ's capture sum exceeds random hybrid's, with the paired interval above 0"
    )


def test_a_span_that_is_not_positive_on_some_resamples_is_dropped(tmp_path):
    per_seed = {s: seed_results(tmp_path, s) for s in SEEDS}
    # Seed 2: all-QAT below all-PTQ. Over the three seeds all-QAT still gains on the mean,
    # but a resample of seed 2 alone has no gain to capture.
    per_seed[2]["methods"]["all_qat"]["final_acc"] = 0.70
    results = _write_mean(tmp_path, experiment(), True, per_seed, 0.0)
    cap = results["summary"]["fedhq"]
    assert cap["acc_capture"] is not None and cap["bootstrap_dropped"]["speed_capture"] == 0
    assert cap["bootstrap_dropped"]["acc_capture"] > 0
    assert cap["bootstrap_dropped"]["sum"] == cap["bootstrap_dropped"]["acc_capture"]
    assert results["paired"]["capture_sum"]["bootstrap_dropped"] > 0


def test_an_undefined_capture_on_the_means_has_no_interval(tmp_path):
    per_seed = {s: seed_results(tmp_path, s) for s in SEEDS}
    for r in per_seed.values():
        r["methods"]["all_qat"]["final_acc"] = 0.6  # never more accurate than all-PTQ
    results = _write_mean(tmp_path, experiment(), True, per_seed, 0.0)
    cap = results["summary"]["fedhq"]
    assert cap["acc_capture"] is None and cap["ci95"]["acc_capture"] is None
    assert cap["bootstrap_dropped"]["acc_capture"] == 2000
    assert cap["ci95"]["speed_capture"] is not None
    paired = results["paired"]["capture_sum"]
    assert paired["ci95"] is None and paired["verdict"].startswith("undefined")


def test_a_figure_only_one_seed_recorded_is_flagged(tmp_path):
    per_seed = {s: seed_results(tmp_path, s) for s in SEEDS}
    for s in (1, 2):
        per_seed[s]["methods"]["fedhq"]["final_acc_fp32"] = None
    results = _write_mean(tmp_path, experiment(), True, per_seed, 0.0)
    fedhq = results["methods"]["fedhq"]
    value = per_seed[0]["methods"]["fedhq"]["final_acc_fp32"]
    assert fedhq["ci95"]["final_acc_fp32"] == [value, value]
    assert fedhq["ci95_single_seed"] == ["final_acc_fp32"]


def test_a_single_seed_run_has_no_intervals(tmp_path):
    results = seed_results(tmp_path, 0)
    text = json.dumps(results)
    assert "ci95" not in text and "paired" not in results and "seeds" not in results
    write_report(results, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "±" not in md and "Paired differences" not in md


# --- the report of several seeds -----------------------------------------------------------------


def row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_the_report_shows_intervals_paired_differences_and_captures(several, tmp_path):
    _, _, results = several
    written = write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "mean over seeds 0, 1, 2" in md and "95% Student-t interval" in md

    fedhq = results["methods"]["fedhq"]
    lo, hi = fedhq["ci95"]["final_acc"]
    cells = row(md, "fedhq")  # the first fedhq row: the methods table
    assert cells[2] == f"{fedhq['final_acc']:.4f} ± {(hi - lo) / 2:.4f}"
    assert cells[5].startswith(f"{fedhq['sim_seconds']:.1f} ± ")

    assert "## Paired differences over seeds" in md
    assert "| method - reference | n | acc at deploy bits | simulated s |" in md
    d = results["paired"]["differences"]["fedhq - all_qat"]["final_acc"]
    assert row(md, "fedhq - all_qat")[1:3] == [
        "3",
        f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]",
    ]
    assert "Capture sum, fedhq minus random_hybrid: +" in md
    assert "FedHQ's capture sum exceeds random hybrid's, with the paired interval above 0." in md

    cap = results["summary"]["fedhq"]
    speed_lo, speed_hi = cap["ci95"]["speed_capture"]
    summary_row = md.split("## Summary")[1]
    assert "dropped resamples" in summary_row
    assert f"{cap['speed_capture']:.4f} [{speed_lo:.4f}, {speed_hi:.4f}]" in summary_row
    assert "mean_acc_lowest_budget_devices 0.7500 [" in summary_row
    assert '"ci95"' not in md and "| by_seed |" not in md  # no raw JSON of the intervals

    bits = md.split("## Accuracy by deployed bit-width")[1]
    assert f"| fedhq | {fedhq['acc_by_bits']['32']:.4f} ± " in bits
    assert {p.name for p in written} >= {"accuracy_vs_bits.png", "accuracy_vs_time.png"}


def test_the_report_of_several_seeds_is_a_function_of_the_saved_json(several, tmp_path):
    _, _, results = several
    write_report(results, tmp_path / "a")
    write_report(json.loads(json.dumps(results)), tmp_path / "b")
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()
    assert not math.isnan(results["methods"]["fedhq"]["ci95"]["final_acc"][0])


def test_the_papers_figures_are_paired_by_seed():
    """FedMPQ against fixed precision on the lowest-budget devices, MQAT against float at the
    narrowest weight x activation width: differences of the same seed, with t intervals."""
    per_seed = {}
    for s, (lift, grid_lift) in enumerate([(0.02, 0.08), (0.03, 0.10), (0.025, 0.09)]):
        grid = {"W4A2": 0.6, "W2A4": 0.6, "W2A2": 0.5}
        per_seed[s] = {
            "methods": {
                "fp": {"acc_by_bits": {"2": 0.70}, "acc_by_widths": grid},
                "mqat_wa": {
                    "acc_by_bits": {"2": 0.70 + lift},
                    "acc_by_widths": {k: v + grid_lift for k, v in grid.items()},
                },
            },
            "summary": {
                "fedmpq": {
                    "fedmpq": {"mean_acc_lowest_budget_devices": 0.80 + lift,
                               "mean_acc_all_devices": 0.84},
                    "fixed": {"mean_acc_lowest_budget_devices": 0.80,
                              "mean_acc_all_devices": 0.84 - lift},
                }
            },
        }  # fmt: skip
    methods = {"fp": per_seed[0]["methods"]["fp"], "mqat_wa": {"acc_by_widths": {"W2A2": 0}},
               "fedmpq": {}, "fixed": {}}  # fmt: skip
    rows = _paired_figures(methods, per_seed)
    low = rows["fedmpq - fixed: mean_acc_lowest_budget_devices"]
    assert (low["method"], low["reference"], low["n"]) == ("fedmpq", "fixed", 3)
    assert low["diff"] == pytest.approx(0.025) and low["ci95"][0] > 0
    assert rows["mqat_wa - fp: W2A2"]["diff"] == pytest.approx(0.09)
    assert rows["mqat_wa - fp: 2-bit"]["diff"] == pytest.approx(0.025)
    assert "fedmpq - all_8bit: mean_acc_all_devices" not in rows  # no all_8bit run
    del per_seed[1]["methods"]["mqat_wa"]["acc_by_widths"]
    assert _paired_figures(methods, per_seed)["mqat_wa - fp: W2A2"]["n"] == 2
    table = "\n".join(_paired_table({"figures": rows}))
    assert "| mqat_wa - fp: W2A2 | 3 | +0.0900 [" in table
