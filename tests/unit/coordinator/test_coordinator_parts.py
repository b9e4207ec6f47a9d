"""Coordinator building blocks without networking: config, aggregation, state, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import RunningMean
from coordinator.checkpoint import (
    LATEST,
    CheckpointError,
    checkpoint_path,
    load_latest_checkpoint,
    save_checkpoint,
)
from coordinator.config import (
    JobConfigError,
    config_hash,
    job_config_from_dict,
    load_job_config,
)
from coordinator.server_optimizers import (
    SERVER_OPTIMIZERS,
    FedAdam,
    FedAvg,
    FedAvgM,
    make_server_optimizer,
)
from coordinator.state import StateStore
from tests.read_only import make_read_only

FAST = settings(max_examples=40, deadline=None)
EXAMPLE = Path(__file__).resolve().parents[3] / "experiments" / "job.example.toml"


def write_job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with a float weight, a bias and an integer buffer."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(3, 4, generator=gen),
        "fc.bias": torch.randn(3, generator=gen),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


# --- config ----------------------------------------------------------------------------------


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_job_config(write_job(tmp_path, ""))
    assert cfg.job.name == "fmnist-lenet" and cfg.job.fleet == "default" and cfg.job.seed == 0
    assert cfg.job.state_dir == tmp_path / "runs" / "fmnist-lenet"
    assert cfg.model.name == "lenet5"
    d = cfg.data
    assert (d.dataset, d.data_dir, d.partition, d.alpha, d.test_samples) == (
        "fashion-mnist",
        None,
        "dirichlet",
        0.5,
        None,
    )
    t = cfg.training
    assert (t.rounds, t.local_epochs, t.batch_size, t.lr, t.optimizer) == (5, 1.0, 64, 1e-3, "adam")
    r = cfg.rounds
    assert (r.fraction, r.min_devices, r.deadline_s, r.quorum, r.register_timeout_s) == (
        1.0,
        2,
        120.0,
        0.8,
        120.0,
    )
    s = cfg.server
    assert (s.optimizer, s.lr, s.momentum, s.beta1, s.beta2, s.eps) == (
        "fedavg",
        1.0,
        0.9,
        0.9,
        0.99,
        1e-3,
    )
    a = cfg.allocation
    assert (a.mode, a.strategy, a.bits) == ("fixed", "qat", 4)
    assert cfg.deploy.bits == (8, 4, 2) and cfg.deploy.storage == "auto"


def test_example_file_loads_and_matches_the_defaults() -> None:
    cfg = load_job_config(EXAMPLE)
    assert cfg == job_config_from_dict({}, base_dir=EXAMPLE.parent)


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path) -> None:
    cfg = load_job_config(
        write_job(tmp_path, '[job]\nstate_dir = "state"\n[data]\ndata_dir = "../d"\n')
    )
    assert cfg.job.state_dir == tmp_path / "state"
    assert cfg.data.data_dir == tmp_path.parent / "d"
    named = load_job_config(write_job(tmp_path, '[job]\nname = "exp-1"\n'))
    assert named.job.state_dir == tmp_path / "runs" / "exp-1"


def test_server_lr_defaults_per_optimizer(tmp_path: Path) -> None:
    adam = job_config_from_dict({"server": {"optimizer": "fedadam"}})
    assert adam.server.lr == SERVER_OPTIMIZERS["fedadam"].default_lr == 1e-2
    given_lr = job_config_from_dict({"server": {"optimizer": "fedadam", "lr": 0.5}})
    assert given_lr.server.lr == 0.5


@pytest.mark.parametrize(
    ("toml", "where", "what"),
    [
        ("[job]\nseed = -1", "job.seed", ">= 0"),
        ('[job]\nseed = "1"', "job.seed", "integer"),
        ('[job]\nfleet = "a/b"', "job.fleet", "MQTT"),
        ('[job]\nname = ""', "job.name", "letters"),
        ('[model]\nname = "vgg"', "model.name", "lenet5"),
        ('[data]\ndataset = "mnist"', "data.dataset", "fashion-mnist"),
        ('[data]\npartition = "shards"', "data.partition", "dirichlet"),
        ("[data]\nalpha = 0", "data.alpha", "> 0"),
        ("[data]\ntest_samples = 0", "data.test_samples", ">= 1"),
        ("[data]\ndata_dir = 3", "data.data_dir", "path"),
        ("[training]\nrounds = 0", "training.rounds", ">= 1"),
        ("[training]\nrounds = 2.5", "training.rounds", "integer"),
        ("[training]\nlocal_epochs = true", "training.local_epochs", "number"),
        ("[training]\nlr = nan", "training.lr", "finite"),
        ('[training]\noptimizer = "rmsprop"', "training.optimizer", "adam"),
        ("[rounds]\nfraction = 0", "rounds.fraction", "> 0"),
        ("[rounds]\nfraction = 1.5", "rounds.fraction", "<= 1"),
        ("[rounds]\nquorum = 0", "rounds.quorum", "> 0"),
        ("[rounds]\nmin_devices = 0", "rounds.min_devices", ">= 1"),
        ("[rounds]\ndeadline_s = -1", "rounds.deadline_s", "> 0"),
        ("[rounds]\nregister_timeout_s = 0", "rounds.register_timeout_s", "> 0"),
        ('[server]\noptimizer = "fedprox"', "server.optimizer", "fedadam"),
        ("[server]\nmomentum = 1.0", "server.momentum", "< 1"),
        ("[server]\nbeta2 = -0.1", "server.beta2", ">= 0"),
        ("[server]\neps = 0", "server.eps", "> 0"),
        ('[allocation]\nmode = "greedy"', "allocation.mode", "fedhq"),
        ('[allocation]\nstrategy = "int8"', "allocation.strategy", "qat"),
        ("[allocation]\nbits = 9", "allocation.bits", "one of"),
        ("[deploy]\nbits = [8, 1]", "deploy.bits", "2..8"),
        ("[deploy]\nbits = []", "deploy.bits", "at least one"),
        ("[deploy]\nbits = [4, 4]", "deploy.bits", "repeat"),
        ('[deploy]\nbits = ["8"]', "deploy.bits", "list of integers"),
        ('[deploy]\nstorage = "int4"', "deploy.storage", "packed"),
        ("[job]\nnme = 1", "job.nme", "allowed keys in [job]: name, fleet, seed, state_dir"),
        ("[trainig]\nlr = 1", "[trainig]", "allowed tables: job, model, data, training"),
        ("job = 3", "[job]", "must be a table"),
    ],
)
def test_every_error_names_file_and_key(tmp_path: Path, toml: str, where: str, what: str) -> None:
    path = write_job(tmp_path, toml)
    with pytest.raises(JobConfigError) as info:
        load_job_config(path)
    msg = str(info.value)
    assert str(path) in msg and where in msg and what in msg, msg


def test_unreadable_or_invalid_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(JobConfigError, match="cannot read"):
        load_job_config(tmp_path / "missing.toml")
    with pytest.raises(JobConfigError, match=r"job\.toml: not valid TOML"):
        load_job_config(write_job(tmp_path, "[job\n"))
    with pytest.raises(JobConfigError, match="did you mean 'training'"):
        job_config_from_dict({"trainig": {}})


def test_to_dict_is_json_and_loads_back(tmp_path: Path) -> None:
    cfg = load_job_config(write_job(tmp_path, '[data]\ndata_dir = "d"\n[deploy]\nbits = [4]\n'))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["deploy"]["bits"] == [4] and d["data"]["data_dir"] == str(tmp_path / "d")
    assert job_config_from_dict(d, source="saved") == cfg


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    base = config_hash(load_job_config(write_job(tmp_path, "")))
    assert base == config_hash(job_config_from_dict({}, base_dir=tmp_path))
    assert len(base) == 64
    for change in [
        {"training": {"lr": 2e-3}},
        {"server": {"optimizer": "fedavgm"}},
        {"allocation": {"bits": 2}},
        {"deploy": {"bits": [8, 4]}},
        {"job": {"seed": 1}},
    ]:
        assert config_hash(job_config_from_dict(change, base_dir=tmp_path)) != base, change
    # Where state lives and how many rounds run do not change what a round computes.
    for same in [{"job": {"state_dir": "/elsewhere"}}, {"training": {"rounds": 50}}]:
        assert config_hash(job_config_from_dict(same, base_dir=tmp_path)) == base, same


# --- RunningMean -----------------------------------------------------------------------------


@st.composite
def weighted_updates(draw: st.DrawFn) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    n = draw(st.integers(1, 8))
    seeds = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    weights = draw(
        st.lists(
            st.floats(0.01, 1e4, allow_nan=False, allow_infinity=False), min_size=n, max_size=n
        )
    )
    return [model_state(s) for s in seeds], weights


def direct_mean(states: list[dict[str, torch.Tensor]], weights: list[float], key: str):
    total = sum(weights)
    return sum(w * s[key].double() for s, w in zip(states, weights, strict=True)) / total


@FAST
@given(weighted_updates())
def test_running_mean_equals_the_direct_weighted_mean(data) -> None:
    states, weights = data
    rm = RunningMean(model_state())
    for s, w in zip(states, weights, strict=True):
        rm.add(s, w)
    mean = rm.mean()
    assert rm.count == len(states)
    assert rm.total_weight == pytest.approx(sum(weights))
    assert set(mean) == {"fc.weight", "fc.bias"}  # the int buffer is not averaged
    for k in mean:
        assert mean[k].dtype == torch.float32
        torch.testing.assert_close(mean[k], direct_mean(states, weights, k).float())


@FAST
@given(weighted_updates(), st.integers(0, 8))
def test_merged_partial_means_equal_one_mean(data, split: int) -> None:
    states, weights = data
    split = min(split, len(states))
    whole, left, right = (RunningMean(model_state()) for _ in range(3))
    for i, (s, w) in enumerate(zip(states, weights, strict=True)):
        whole.add(s, w)
        (left if i < split else right).add(s, w)
    # A worker ships its partial aggregate as tensors; the receiver rebuilds and merges it.
    shipped = RunningMean.from_partial(model_state(), right.partial_state())
    left.merge(shipped)
    assert left.count == whole.count
    assert left.total_weight == pytest.approx(whole.total_weight)
    for k, v in whole.mean().items():
        torch.testing.assert_close(left.mean()[k], v, rtol=1e-6, atol=1e-7)


def test_running_mean_rejects_bad_updates_and_stays_unchanged() -> None:
    rm = RunningMean(model_state())
    rm.add(model_state(1), 2.0)
    before = rm.mean()
    bad_shape = model_state(2) | {"fc.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match="fc.bias"):
        rm.add(bad_shape, 1.0)
    nan = model_state(2)
    nan["fc.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc.weight.*NaN"):
        rm.add(nan, 1.0)
    inf = model_state(2) | {"fc.bias": torch.tensor([1.0, float("inf"), 0.0])}
    with pytest.raises(ValueError, match="fc.bias.*Inf"):
        rm.add(inf, 1.0)
    wrong_dtype = model_state(2) | {"fc.bias": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="fc.bias.*float64"):
        rm.add(wrong_dtype, 1.0)
    missing = {k: v for k, v in model_state(2).items() if k != "fc.bias"}
    with pytest.raises(ValueError, match="missing tensors.*fc.bias"):
        rm.add(missing, 1.0)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        rm.add(model_state(2) | {"extra": torch.zeros(1)}, 1.0)
    for w in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="weight"):
            rm.add(model_state(2), w)
    assert rm.count == 1 and rm.total_weight == 2.0
    for k, v in before.items():
        torch.testing.assert_close(rm.mean()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no updates"):
        RunningMean(model_state()).mean()
    other = RunningMean({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="different models"):
        rm.merge(other)


def test_partial_state_is_one_sum_per_tensor() -> None:
    """The shipped format names each tensor's sum, whatever the accumulator keeps inside."""
    rm = RunningMean(model_state())
    states, weights = [model_state(1), model_state(2)], [2.0, 3.0]
    for s, w in zip(states, weights, strict=True):
        rm.add(s, w)
    partial = rm.partial_state()
    assert list(partial) == ["sum.fc.weight", "sum.fc.bias", "meta.count", "meta.total_weight"]
    for k in ("fc.weight", "fc.bias"):
        expected = sum(w * s[k].double() for s, w in zip(states, weights, strict=True))
        torch.testing.assert_close(partial["sum." + k], expected)
    partial["sum.fc.bias"].zero_()  # a copy: the aggregate is untouched
    expected_bias = direct_mean(states, weights, "fc.bias").float()
    torch.testing.assert_close(rm.mean()["fc.bias"], expected_bias)
    partial["sum.fc.bias"] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"partial sum 'fc.bias': expected \(3,\) torch.float64"):
        RunningMean.from_partial(model_state(), partial)


# --- strategies ------------------------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean_and_keeps_int_buffers() -> None:
    glob = model_state(0)
    glob["bn.num_batches_tracked"] = torch.tensor(7)
    states = [model_state(s) for s in (1, 2, 3)]
    samples = [10, 30, 60]
    rm = RunningMean(glob)
    for s, n in zip(states, samples, strict=True):
        rm.add(s, n)
    new = FedAvg().apply(glob, rm.mean())
    for k in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(new[k], direct_mean(states, samples, k).float())
    assert new["bn.num_batches_tracked"].item() == 7
    assert FedAvg().state_dict() == {}


def two_rounds() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g0 = {"w": torch.tensor([1.0, -2.0, 0.5]), "step": torch.tensor(3)}
    means = [{"w": torch.tensor([1.5, -2.5, 0.5])}, {"w": torch.tensor([1.0, -1.0, 2.0])}]
    return g0, means


def test_fedavgm_follows_its_formula_over_two_rounds() -> None:
    lr, mom = 0.7, 0.9
    g, means = two_rounds()
    s = FedAvgM(lr=lr, momentum=mom)
    w, m = g["w"].clone(), torch.zeros(3)
    for mean in means:
        m = mom * m + (mean["w"] - w)
        w = w + lr * m
        g = s.apply(g, mean)
        torch.testing.assert_close(g["w"], w)
        assert g["step"].item() == 3
    torch.testing.assert_close(s.state_dict()["m.w"], m)


def test_fedadam_follows_reddi_et_al_over_two_rounds() -> None:
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    g, means = two_rounds()
    s = FedAdam(lr=lr, beta1=b1, beta2=b2, eps=eps)
    w, m, v = g["w"].clone(), torch.zeros(3), torch.zeros(3)
    for mean in means:
        delta = mean["w"] - w
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        w = w + lr * m / (v.sqrt() + eps)
        g = s.apply(g, mean)
        torch.testing.assert_close(g["w"], w)
    state = s.state_dict()
    torch.testing.assert_close(state["m.w"], m)
    torch.testing.assert_close(state["v.w"], v)


@pytest.mark.parametrize("make", [lambda: FedAvgM(0.5, 0.8), lambda: FedAdam(0.05)])
def test_server_state_round_trips(make) -> None:
    g, (first, second) = two_rounds()
    a = make()
    g1 = a.apply(g, first)
    b = make()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.apply(g1, second)["w"], a.apply(g1, second)["w"])
    with pytest.raises(ValueError, match="unexpected state tensor"):
        make().load_state_dict({"q.w": torch.zeros(3)})
    wrong = make()
    wrong.load_state_dict({"m.w": torch.zeros(5)})
    with pytest.raises(ValueError, match="does not fit"):
        wrong.apply(g, first)


def test_strategies_reject_mismatched_means_and_bad_hyperparameters() -> None:
    g, (first, _) = two_rounds()
    with pytest.raises(ValueError, match="lacks"):
        FedAvg().apply(g, {"other": torch.zeros(3)})
    with pytest.raises(ValueError, match="'w'"):
        FedAvg().apply(g, {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="NaN"):
        FedAvg().apply(g, {"w": torch.tensor([0.0, float("nan"), 0.0])})
    with pytest.raises(ValueError, match="no server state"):
        FedAvg().load_state_dict({"m.w": torch.zeros(3)})
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        FedAdam(lr=0)


def test_make_server_optimizer_from_the_server_table() -> None:
    assert isinstance(make_server_optimizer(job_config_from_dict({}).server), FedAvg)
    fedavgm = job_config_from_dict({"server": {"optimizer": "fedavgm", "lr": 0.5}})
    m = make_server_optimizer(fedavgm.server)
    assert isinstance(m, FedAvgM) and (m.lr, m.momentum) == (0.5, 0.9)
    a = make_server_optimizer(
        job_config_from_dict({"server": {"optimizer": "fedadam", "eps": 1e-4}}).server
    )
    assert isinstance(a, FedAdam) and (a.lr, a.beta1, a.beta2, a.eps) == (1e-2, 0.9, 0.99, 1e-4)


# --- StateStore ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    s = StateStore.in_dir(tmp_path / "state")
    for dev in ("a", "b", "c"):
        s.upsert_device(dev, {"kind": "rpi4"}, {"n": 100})
    yield s
    s.close()


def test_record_update_counts_once(store: StateStore) -> None:
    store.open_round(0, ["a", "b"])
    assert store.record_update(0, "a", 100, 0.5, 1.2) is True
    assert store.record_update(0, "a", 100, 0.5, 1.2) is False  # replayed
    assert store.record_update(0, "c", 100, 0.5, 1.2) is False  # not selected
    assert store.record_update(1, "a", 100, 0.5, 1.2) is False  # no such round
    (rnd,) = store.round_history()
    assert rnd["received"] == 1
    assert [u["device_id"] for u in store.round_updates(0)] == ["a"]
    store.close_round(0, 0.8, {4: 0.7}, stragglers=1, host_seconds=3.0)
    assert store.record_update(0, "b", 100, 0.5, 1.2) is False  # late


def test_concurrent_updates_from_threads_count_once(store: StateStore) -> None:
    store.open_round(0, ["a", "b", "c"])
    results: list[bool] = []
    lock = threading.Lock()

    def report(dev: str) -> None:
        ok = store.record_update(0, dev, 10, None, None)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=report, args=(d,)) for d in ["a", "b", "c"] * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 3
    assert store.round_history()[0]["received"] == 3


def test_round_history_and_reopen(tmp_path: Path, store: StateStore) -> None:
    assert store.last_completed_round() is None
    store.open_round(0, ["a", "b"])
    store.record_update(0, "a", 50, 0.4, 1.0)
    store.close_round(0, 0.81, {8: 0.8, 4: 0.75}, stragglers=1, host_seconds=2.5, sim_seconds=9.0)
    store.open_round(1, ["b", "c"])
    assert store.last_completed_round() == 0
    with pytest.raises(ValueError, match="already done"):
        store.open_round(0, ["a"])
    with pytest.raises(ValueError, match="not open"):
        store.close_round(0, 0.9, None, 0, 1.0)
    store.set_meta("config_hash", "abc")
    assert store.setdefault_meta("config_hash", "xyz") == "abc"
    store.set_assignment("a", "qat", 4, {"conv1": 8, "fc": 4})
    store.set_online("b", False)
    store.close()

    again = StateStore.in_dir(tmp_path / "state")
    try:
        h = again.round_history()
        assert [r["round"] for r in h] == [0, 1] and [r["status"] for r in h] == ["done", "open"]
        assert h[0]["selected"] == ["a", "b"] and h[0]["received"] == 1
        assert h[0]["acc_deploy"] == {8: 0.8, 4: 0.75} and h[0]["sim_seconds"] == 9.0
        assert h[0]["acc_fp32"] == 0.81 and h[0]["stragglers"] == 1
        assert h[1]["acc_deploy"] is None and h[1]["finished_at"] is None
        assert again.last_completed_round() == 0
        assert again.get_meta("config_hash") == "abc" and again.get_meta("nope") is None
        asg = again.assignment("a")
        assert asg is not None and (asg.strategy, asg.bits) == ("qat", 4)
        assert asg.per_layer_bits == {"conv1": 8, "fc": 4}
        assert again.assignment("b") is None
        assert [d.id for d in again.devices(online_only=True)] == ["a", "c"]
        assert again.devices()[0].profile == {"kind": "rpi4"}
        assert again.set_round_accuracy(1, 0.5, {2: 0.4}) is True
        assert again.round_history()[1]["acc_deploy"] == {2: 0.4}
    finally:
        again.close()


def test_reopening_an_open_round_and_rolling_back(store: StateStore) -> None:
    store.open_round(0, ["a"])
    store.record_update(0, "a", 10, None, None)
    store.open_round(0, ["a", "b"])  # restarted mid-round: start it afresh
    assert store.round_history()[0]["received"] == 0 and store.round_updates(0) == []
    store.close_round(0, None, None, 0, 1.0)
    store.open_round(1, ["a"])
    store.record_update(1, "a", 10, None, None)
    assert store.rollback_to(0) == 1
    assert [r["round"] for r in store.round_history()] == [0]
    assert store.round_updates(1) == []
    assert store.rollback_to(None) == 1 and store.round_history() == []


def test_devices_and_assignments(store: StateStore) -> None:
    assert store.set_online("ghost", True) is False
    assert store.set_online("a", False) is True
    assert [d.id for d in store.devices(online_only=True)] == ["b", "c"]
    store.upsert_device("a", {"kind": "rpi5"}, {"n": 7})  # re-registration: online again
    a = store.device("a")
    assert a is not None and a.online and a.profile == {"kind": "rpi5"} and a.data == {"n": 7}
    assert a.registered_at <= a.last_seen
    with pytest.raises(ValueError, match="unknown device"):
        store.set_assignment("ghost", "qat", 4)
    store.set_assignment("b", "ptq", 8)
    store.set_assignment("b", "qat", 2)
    assert store.assignments()["b"].bits == 2


# --- checkpoints -----------------------------------------------------------------------------


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_round_trip_and_pruning(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path) is None
    server = {"m.fc.weight": torch.ones(3, 4)}
    for rnd in range(6):
        path = save_checkpoint(tmp_path, rnd, model_state(rnd), server)
        assert path == checkpoint_path(tmp_path, rnd)
    ckdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [
        LATEST,
        "round-00003.safetensors",
        "round-00004.safetensors",
        "round-00005.safetensors",
    ]
    assert (ckdir / LATEST).read_text().strip() == "round-00005.safetensors"
    found = load_latest_checkpoint(tmp_path)
    assert found is not None
    rnd, model, srv = found
    assert rnd == 5
    assert_state_equal(model, model_state(5))
    assert_state_equal(srv, server)
    # Nothing from the strategy (FedAvg) is fine too.
    save_checkpoint(tmp_path, 6, model_state(6), {})
    assert load_latest_checkpoint(tmp_path)[2] == {}  # type: ignore[index]


def test_a_file_newer_than_latest_is_not_used(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, model_state(1), {})
    save_checkpoint(tmp_path, 2, model_state(2), {})
    (tmp_path / "checkpoints" / LATEST).write_text("round-00001.safetensors\n")
    assert load_latest_checkpoint(tmp_path)[0] == 1  # type: ignore[index]
    # Saving after a rollback drops the abandoned newer file.
    save_checkpoint(tmp_path, 2, model_state(7), {})
    assert_state_equal(load_latest_checkpoint(tmp_path)[1], model_state(7))  # type: ignore[index]


def test_corrupt_latest_falls_back_with_a_warning(tmp_path: Path, caplog) -> None:
    save_checkpoint(tmp_path, 1, model_state(1), {})
    save_checkpoint(tmp_path, 2, model_state(2), {})
    checkpoint_path(tmp_path, 2).write_bytes(b"\x00" * 16)
    with caplog.at_level(logging.WARNING, logger="coordinator.checkpoint"):
        found = load_latest_checkpoint(tmp_path)
    assert found is not None and found[0] == 1
    assert_state_equal(found[1], model_state(1))
    assert "round-00002.safetensors" in caplog.text
    # A truncated file is caught as well; with nothing readable left, say so loudly.
    data = checkpoint_path(tmp_path, 1).read_bytes()
    checkpoint_path(tmp_path, 1).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest_checkpoint(tmp_path)


def test_write_failure_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, model_state(1), {})
    # A directory where the new file must go: renaming onto it fails even for root.
    checkpoint_path(tmp_path, 2).mkdir()
    (checkpoint_path(tmp_path, 2) / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="round 2"):
        save_checkpoint(tmp_path, 2, model_state(2), {})
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / LATEST).read_text().strip() == "round-00001.safetensors"
    assert not list(ckdir.glob(".*.tmp"))
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and found[0] == 1
    assert_state_equal(found[1], model_state(1))


def test_checkpoints_path_taken_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path, 0, model_state(), {})


def test_read_only_directory(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, model_state(1), {})
    ckdir = tmp_path / "checkpoints"
    undo = make_read_only(ckdir)
    if undo is None:
        pytest.skip("no way to make a directory read-only for root here (chattr +i refused)")
    try:
        with pytest.raises(CheckpointError, match="round-00002.safetensors"):
            save_checkpoint(tmp_path, 2, model_state(2), {})
    finally:
        undo()
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and found[0] == 1


def test_checkpoint_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="round"):
        save_checkpoint(tmp_path, -1, model_state(), {})
    with pytest.raises(ValueError, match="not a tensor"):
        save_checkpoint(tmp_path, 0, {"w": [1.0]}, {})  # type: ignore[dict-item]
    # Tensors sharing storage (tied weights) and non-contiguous views are saved as copies.
    w = torch.randn(4, 4)
    save_checkpoint(tmp_path, 0, {"a": w, "b": w, "t": w.t()}, {})
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and torch.equal(found[1]["t"], w.t())
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [LATEST, "round-00000.safetensors"]


def test_disk_full_mid_write_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, 1, model_state(1), {})

    def full(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("coordinator.checkpoint.save_file", full)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, 2, model_state(2), {})
    ckdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [LATEST, "round-00001.safetensors"]
    assert load_latest_checkpoint(tmp_path)[0] == 1  # type: ignore[index]
