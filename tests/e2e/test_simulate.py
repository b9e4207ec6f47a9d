"""`bitfleet simulate` end to end on tiny data: the daemon's code over the in-process bus and
over a real Mosquitto, results.json's contract, the report, and bad experiment files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitfleet.cli.main import main
from bitfleet.protocol.inprocess import InProcessBus, topic_matches
from coordinator.config import JobConfigError
from fleet.simulate.experiment import load_experiment
from fleet.simulate.experiment_run import run_experiment
from fleet.simulate.results import _capture
from tests.tiny_fmnist import make_tiny_fmnist

EXPERIMENT = """
[simulate]
name = "tiny"
eval_bits = [32, 4, 2]
devices = [
    {{ board = "rpi4", count = 2 }},
    {{ board = "rpi5", count = 1 }},
    {{ board = "jetson-nano", count = 1, budget_bits = 2 }},
]
[simulate.quick]
training = {{ rounds = 1 }}
[data]
data_dir = "{data}"
alpha = 0.5
[training]
rounds = 2
local_epochs = 0.5
batch_size = 32
[rounds]
quorum = 1.0
deadline_s = 60.0
register_timeout_s = 30.0
[deploy]
bits = [2]
[allocation]
bits = 2
[methods.fedhq]
allocation = {{ mode = "fedhq", fine = true, fine_candidates = 2, xi = 1.0, a = 0.0 }}
[methods.all_qat]
allocation = {{ mode = "fixed", strategy = "qat" }}
[methods.all_ptq]
allocation = {{ mode = "fixed", strategy = "ptq" }}
[methods.mpq]
allocation = {{ mode = "fixed", strategy = "mpq", bits_from = "profile" }}
[ablations."xi=0.3"]
allocation = {{ mode = "fedhq", xi = 0.3 }}
"""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    data = make_tiny_fmnist(tmp_path / "fmnist", n_train=400, n_test=100)
    path = tmp_path / "tiny.toml"
    path.write_text(EXPERIMENT.format(data=data))
    return path


def test_simulate_writes_results_report_and_plots(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(experiment), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"fedhq", "all_qat", "all_ptq", "mpq"}
    for m in results["methods"].values():
        assert {"final_acc", "final_acc_fp32", "deploy_bits", "sim_seconds", "host_seconds",
                "rounds", "curve", "assignment", "acc_by_bits"} <= set(m)  # fmt: skip
        assert m["rounds"] == 2 and len(m["curve"]) == 2
        assert set(m["acc_by_bits"]) == {"32", "4", "2"}
        assert m["curve"][-1][1] == pytest.approx(m["sim_seconds"], rel=1e-6)
        assert len(m["assignment"]) == 4
    assert set(results["methods"]["all_qat"]["assignment"].values()) == {"qat"}
    fedhq = results["methods"]["fedhq"]
    assert set(fedhq["significance"]) == set(fedhq["assignment"])
    assert fedhq["fine"]["candidates"]  # the fine stage ran its trials
    # QAT on these boards costs more per step than float: all-QAT rounds are longer.
    assert (
        results["methods"]["all_qat"]["sim_seconds"] > results["methods"]["all_ptq"]["sim_seconds"]
    )
    assert results["allocation_seconds"]["coarse"] < 1.0
    assert results["allocation_seconds"]["fine"] > 0.0
    mpq = results["methods"]["mpq"]
    budgets = mpq["device_budget"]
    assert budgets["dev3-jetson-nano"] == 2 and set(mpq["device_acc"]) == set(budgets)
    assert set(mpq["layer_bits"]["dev3-jetson-nano"].values()) == {2}
    assert "xi=0.3" in results["ablations"]
    assert {"speed_capture", "acc_capture"} <= set(results["summary"]["fedhq"])
    for name in ("report.md", "accuracy_vs_time.png", "accuracy_vs_bits.png", "allocation.png"):
        assert (out / name).stat().st_size > 0
    assert "fedhq" in (out / "report.md").read_text()


def test_simulate_runs_over_a_real_broker(experiment: Path, tmp_path: Path, mosquitto) -> None:
    text = experiment.read_text()
    only_two = text.split("[methods.fedhq]")[0] + (
        '[methods.all_qat]\nallocation = { mode = "fixed", strategy = "qat" }\n'
    )
    experiment.write_text(only_two)
    results = run_experiment(
        experiment, tmp_path / "out", quick=True, broker=f"mqtt://127.0.0.1:{mosquitto.port}"
    )
    m = results["methods"]["all_qat"]
    assert m["rounds"] == 1 and len(m["assignment"]) == 4


def test_simulate_over_seeds_writes_means_and_each_seed(experiment: Path, tmp_path: Path) -> None:
    text = experiment.read_text()
    two = text.split("[methods.fedhq]")[0].replace(
        "[simulate.quick]", "[simulate.quick]\nseeds = [0, 1]"
    )
    experiment.write_text(
        two
        + '[methods.all_qat]\nallocation = { mode = "fixed", strategy = "qat" }\n'
        + '[methods.all_ptq]\nallocation = { mode = "fixed", strategy = "ptq" }\n'
        + '[methods.fedhq]\nallocation = { mode = "fedhq" }\n'
    )
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(experiment), "--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    per_seed = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert [per_seed[s]["seed"] for s in (0, 1)] == [0, 1]
    # Another seed is another data split: the devices hold other samples.
    assert (
        per_seed[0]["methods"]["fedhq"]["significance"]
        != per_seed[1]["methods"]["fedhq"]["significance"]
    )
    for name, m in results["methods"].items():
        runs = [per_seed[s]["methods"][name] for s in (0, 1)]
        for key in ("final_acc", "sim_seconds"):
            assert m[key] == pytest.approx(sum(r[key] for r in runs) / 2, abs=1e-4)
            assert [m["by_seed"][str(s)][key] for s in (0, 1)] == [r[key] for r in runs]
        assert m["acc_by_bits"]["2"] == pytest.approx(
            sum(r["acc_by_bits"]["2"] for r in runs) / 2, abs=1e-4
        )
        assert len(m["curve"]) == 1 and m["rounds"] == 1
    # Captures come from the means, not averaged per seed.
    q, p, f = (results["methods"][n] for n in ("all_qat", "all_ptq", "fedhq"))
    if q["sim_seconds"] > p["sim_seconds"]:
        expected = (q["sim_seconds"] - f["sim_seconds"]) / (q["sim_seconds"] - p["sim_seconds"])
        assert results["summary"]["fedhq"]["speed_capture"] == pytest.approx(expected, abs=1e-3)
    assert set(results["summary_by_seed"]) == {"0", "1"}
    assert "seeds 0, 1" in (out / "report.md").read_text()
    assert (out / "seed-1" / "report.md").exists()


def test_seeds_must_be_distinct_non_negative_integers(experiment: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--config", str(experiment), "--out", str(tmp_path), "--seeds", "0,x"])
    text = experiment.read_text().replace('name = "tiny"', 'name = "tiny"\nseeds = [1, 1]')
    experiment.write_text(text)
    with pytest.raises(JobConfigError, match=r"simulate.seeds"):
        load_experiment(experiment)


def test_activation_widths_are_trained_evaluated_and_deployed(
    experiment: Path, tmp_path: Path
) -> None:
    """W2A2 end to end: QAT-side devices train with 2-bit activations, every round is scored at
    W2A2 and W2A4 beside the weight-only widths, and the method deploys at W2A2."""
    text = experiment.read_text()
    text = text.replace("[deploy]\nbits = [2]", "[deploy]\nbits = [2]\nact_bits = [2, 4]")
    text = text.replace("[allocation]\nbits = 2", "[allocation]\nbits = 2\nact_bits = 2")
    for name in ("fedhq", "mpq"):  # two methods are enough here
        text = text.split(f"[methods.{name}]")[0] + "\n".join(
            text.split(f"[methods.{name}]")[1].split("\n")[2:]
        )
    text = text.split("[ablations")[0]
    path = tmp_path / "act.toml"
    path.write_text(text)
    results = run_experiment(path, tmp_path / "out")
    for m in results["methods"].values():
        assert m["deploy_act_bits"] == 2
        assert set(m["acc_by_widths"]) == {"W4A4", "W4A2", "W2A4", "W2A2"}
        assert m["final_acc"] == m["acc_by_widths"]["W2A2"]
        assert all(point[2] is not None for point in m["curve"])  # rounds scored at W2A2


def test_bad_experiment_files_say_what_is_wrong(tmp_path: Path, experiment: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(experiment.read_text().replace('board = "rpi5"', 'board = "pi9000"'))
    with pytest.raises(JobConfigError, match=r"simulate.devices\[1\].board"):
        load_experiment(bad)
    bad.write_text(experiment.read_text().replace('strategy = "ptq"', 'strategy = "magic"'))
    with pytest.raises(JobConfigError, match=r"methods.all_ptq.*allocation.strategy"):
        load_experiment(bad)
    bad.write_text("[methods.a]\n")
    with pytest.raises(JobConfigError, match=r"\[simulate\]"):
        load_experiment(bad)
    with pytest.raises(FileNotFoundError):
        load_experiment(tmp_path / "missing.toml")


def test_only_named_methods_and_ablations_run(experiment: Path, tmp_path: Path) -> None:
    exp = load_experiment(experiment).only(["all_ptq", "xi=0.3"])
    assert list(exp.methods) == ["all_ptq"] and list(exp.ablations) == ["xi=0.3"]
    with pytest.raises(JobConfigError, match=r"no method or ablation 'magic'; known: fedhq"):
        load_experiment(experiment).only(["magic"])
    with pytest.raises(JobConfigError, match=r"at least one method"):
        load_experiment(experiment).only(["xi=0.3"])
    out = tmp_path / "only"
    assert main(["simulate", "--config", str(experiment), "--out", str(out), "--quick",
                 "--methods", "all_ptq"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["all_ptq"] and results["ablations"] == {}


def test_in_process_bus_matches_topics_and_keeps_retained_messages() -> None:
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d")
    assert topic_matches("a/#", "a/b/c") and not topic_matches("a/+", "a/b/c")
    bus = InProcessBus()
    got: list[tuple[str, bytes]] = []
    bus.publish("f/register/d1", b"hello", retain=True)
    sub = bus.transport("c", lambda t, p: got.append((t, p)), subscriptions=["f/register/+"])
    sub.start()
    will = bus.transport("d2", lambda t, p: None, will=("f/register/d2", b"bye", False))
    will.start()
    will._kill()  # vanishing without stop(): the bus publishes the last will
    sub.stop()
    assert got == [("f/register/d1", b"hello"), ("f/register/d2", b"bye")]


def test_capture_is_a_share_only_when_all_qat_gains() -> None:
    def run(acc: float, sim: float) -> dict[str, float]:
        return {"final_acc": acc, "sim_seconds": sim}

    methods = {"all_qat": run(0.80, 120.0), "all_ptq": run(0.76, 80.0), "fedhq": run(0.79, 90.0)}
    assert _capture(methods, "fedhq") == {"speed_capture": 0.75, "acc_capture": 0.75}
    # A short run can leave all-QAT below all-PTQ: the ratio would be -3, not a share.
    methods["all_qat"] = run(0.7844, 110.7)
    methods["all_ptq"] = run(0.7862, 79.3)
    cap = _capture(methods, "fedhq")
    assert cap is not None and cap["acc_capture"] is None and cap["speed_capture"] is not None
    assert "not more accurate" in cap["note"] and "-0.0018" in cap["note"]
    assert _capture({"fedhq": run(0.8, 1.0)}, "fedhq") is None
