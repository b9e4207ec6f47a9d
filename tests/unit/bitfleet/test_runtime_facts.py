"""What a board's runtime loads, probed on the board and read back at the door."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from bitfleet.profiles import load_profile, profile_summary
from bitfleet.protocol import ProtocolError
from bitfleet.registration import Registration
from bitfleet.runtime_facts import OPSET_BASE, RuntimeFacts, newest_loadable_opset, probe_runtime


def test_this_runtime_is_probed() -> None:
    facts = probe_runtime()
    assert facts.onnxruntime == ort.__version__
    assert facts.max_opset == newest_loadable_opset() >= OPSET_BASE
    assert RuntimeFacts.from_dict(facts.to_dict()) == facts


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"onnxruntime": "1.22.1", "max_opset": 2**63}, "max_opset"),
        ({"onnxruntime": "1.22.1", "max_opset": 12}, "max_opset"),
        ({"onnxruntime": "'; DROP TABLE", "max_opset": 22}, "onnxruntime"),
        ({"onnxruntime": "1.22.1", "max_opset": 22, "cpu_features": ["sse2"]}, "cpu_features"),
        ("1.22.1", "object"),
    ],
)
def test_implausible_runtime_facts_are_refused(raw: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RuntimeFacts.from_dict(raw)


def _registration(runtime: dict | None) -> dict:
    """A registration body whose profile carries `runtime` as sent (unchecked)."""
    profile = profile_summary(load_profile("rpi4"), {}, None)
    if runtime is not None:
        profile["runtime"] = runtime
    data = {"n_samples": 2, "label_hist": [1, 1]}
    return {"device_id": "d", "profile": profile, "data": data, "sent_at": 0.0}


def test_a_registration_carries_its_runtime_or_none() -> None:
    jetpack = {"onnxruntime": "1.20.1", "max_opset": 21, "cpu_features": []}
    facts = RuntimeFacts.from_dict(jetpack)
    summary = profile_summary(load_profile("rpi4"), {}, None, facts)
    assert summary["runtime"] == facts.to_dict()
    reg = Registration.from_message(_registration(jetpack), num_classes=2)
    assert reg.runtime == RuntimeFacts("1.20.1", 21, ())
    assert Registration.from_message(_registration(None), num_classes=2).runtime is None
    bad = _registration({**jetpack, "max_opset": "22"})
    with pytest.raises(ProtocolError, match="profile.runtime.max_opset") as info:
        Registration.from_message(bad, num_classes=2)
    assert info.value.reason == "bad_register"
