"""The assigner: one `Assignment` per device, stored, and restored on resume."""

from __future__ import annotations

from pathlib import Path

from bitfleet.assignment import Assignment
from bitfleet.models import create_model
from coordinator.assigner import Assigner
from coordinator.config import job_config_from_dict
from coordinator.state import StateStore
from tests.fleet_values import registration


def _assigner(store: StateStore, allocation: dict) -> tuple[Assigner, list]:
    cfg = job_config_from_dict({"allocation": allocation, "deploy": {"bits": [8, 4, 2]}})
    sent: list[tuple[str, Assignment]] = []
    model = create_model("lenet5")
    assigner = Assigner(
        cfg, store, model, model_bytes=1000, publish=lambda d, a: sent.append((d, a))
    )
    return assigner, sent


def _register(store: StateStore, assigner: Assigner, device: str, board: str) -> None:
    reg = registration(device, board=board)
    store.upsert_device(device, reg.profile, reg.data.to_dict())
    assigner.registered(reg)


def test_fixed_mqat_assignment_carries_the_board_widths_and_deploy_width(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as store:
        assigner, sent = _assigner(store, {"mode": "fixed", "strategy": "mqat"})
        _register(store, assigner, "pi4", "rpi4")
        _register(store, assigner, "pi5", "rpi5")
        pi4, pi5 = assigner.assignments["pi4"], assigner.assignments["pi5"]
        # MQAT trains over the widths the boards can hold; both deploy at 8, as no limit binds.
        assert (pi4.bit_set, pi4.deploy_bits) == ((2, 4, 8), 8)
        assert (pi5.bit_set, pi5.deploy_bits) == ((2, 4, 8), 8)
        assert [d for d, _ in sent] == ["pi4", "pi5"]
        _register(store, assigner, "pi4", "rpi4")  # a restarted board hears the same again
        assert sent[-1] == ("pi4", pi4)
        assert store.assignment("pi4").strategy == "mqat"


def test_fedmpq_layer_bits_survive_a_restart(tmp_path: Path) -> None:
    mpq = {"mode": "fixed", "strategy": "mpq", "bits": 4}
    revised = {
        "features.0": 8, "features.3": 6, "classifier.0": 3, "classifier.2": 4, "classifier.4": 8
    }  # fmt: skip
    with StateStore(tmp_path / "s.sqlite") as store:
        first, _ = _assigner(store, mpq)
        _register(store, first, "d0", "rpi5")
        initial = first.assignments["d0"].per_layer_bits
        assert initial is not None and initial != revised
        store.set_assignment("d0", "mpq", 4, revised)  # what a round's pruning-growing stored
        resumed, sent = _assigner(store, mpq)
        resumed.restore()
        assert set(resumed.registrations) == {"d0"}
        resumed.registered(registration("d0", board="rpi5"))
        resumed.allocate_all(resumed=True)
        assert resumed.assignments["d0"].per_layer_bits == revised
        assert all(a.per_layer_bits == revised for _, a in sent)
        assert resumed.assignments["d0"].final_bits() == revised


def test_activation_widths_reach_the_methods_that_train_with_them(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as store:
        allocation = {"mode": "fixed", "strategy": "mqat", "act_bits": 2, "act_bit_set": [2, 4]}
        assigner, _ = _assigner(store, allocation)
        _register(store, assigner, "pi5", "rpi5")
        a = assigner.assignments["pi5"]
        assert (a.act_bits, a.act_bit_set) == (2, (2, 4))
        assert a.method().act_bit_set == (2, 4)
        assert "A{2,4}" in a.describe()
    with StateStore(tmp_path / "p.sqlite") as store:  # PTQ trains in float: no activation bits
        assigner, _ = _assigner(store, {"mode": "fixed", "strategy": "ptq", "act_bits": 2})
        _register(store, assigner, "pi5", "rpi5")
        assert assigner.assignments["pi5"].act_bits is None
    with StateStore(tmp_path / "f.sqlite") as store:  # the default: float activations
        assigner, _ = _assigner(store, {"mode": "fixed", "strategy": "qat"})
        _register(store, assigner, "pi5", "rpi5")
        assert assigner.assignments["pi5"].act_bits is None
