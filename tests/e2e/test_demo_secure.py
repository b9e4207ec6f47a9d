"""`bitfleet demo --secure`: the demo through a provisioned fleet's Mosquitto, over TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fleet.provision import load_provisioned
from tests.conftest import require_mosquitto
from tests.proc_cmdline import CmdlineSampler, fleet_passwords
from tests.tiny_fmnist import make_tiny_fmnist


def test_demo_secure_runs_over_tls_with_one_account_per_device(tmp_path: Path) -> None:
    """Two agents and the coordinator, each logged in with its own provisioned account
    (Mosquitto's log names the user of every connection), one round, a model per board; no
    password reaches the demo's output, nor any process's command line while it runs."""
    require_mosquitto()
    data = make_tiny_fmnist(tmp_path / "data", n_train=400, n_test=100)
    out = tmp_path / "demo"
    summary = tmp_path / "demo.json"
    cmd = [
        sys.executable, "-m", "bitfleet", "demo", "--secure", "--devices", "2", "--rounds", "1",
        "--out", str(out), "--json", str(summary),
    ]  # fmt: skip
    env = {**os.environ, "BITFLEET_DATA_DIR": str(data)}

    def is_agent(line: str) -> bool:  # this test's agents: their --out-dir lies under `out`
        return " agent run " in line and str(out / "devices") in line

    with CmdlineSampler(lambda: fleet_passwords(out / "fleet"), is_agent) as sampler:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 1/1" in done.stdout and "mqtts://coordinator@127.0.0.1" in done.stdout
    result = json.loads(summary.read_text())
    assert result["rounds_completed"] == 1 and len(result["onnx_files"]) == 2
    fleet = load_provisioned(out / "fleet")
    assert sorted(row["device"] for row in result["per_device"]) == sorted(fleet.devices)
    # Every candidate came back timed: the ACL lets a device read its `candidate` topic and
    # write its `timing` one. The second device's 40 KiB limit gave it fewer than 8 bits.
    for row in result["per_device"]:
        assert row["deploy"]["candidates"], row
        assert all(c["latency_ms"] for c in row["deploy"]["candidates"]), row["deploy"]
    limited = next(r for r in result["per_device"] if r["limits"])
    assert limited["limits"] == {"max_model_bytes": 40 * 1024}
    assert limited["bits"] < 8 and limited["bytes"] <= 40 * 1024
    for secret in [fleet.coordinator_password, *fleet.devices.values()]:
        assert secret not in done.stdout + done.stderr
    broker_log = (out / "logs" / "mosquitto.log").read_text()
    for user in ["coordinator", *fleet.devices]:
        assert f"u'{user}'" in broker_log, broker_log

    # The scan looked at both agents while they ran, and found no password on any command line.
    # By device, not by pid: a process between fork and exec shows its parent's command line.
    seen = {line.split("--device-id ")[1].split()[0] for line in sampler.watched.values()}
    assert len(seen) == 2, (sampler.scans, sampler.watched)
    for line in sampler.watched.values():
        assert "--password-file" in line, line
    assert sampler.leaks == []
