"""The provisioned fleet (`bitfleet coordinator provision`) against a real Mosquitto.

What a stranger on the network, or one compromised board, must not be able to do: log in without
the fleet's credentials, talk plaintext, trust a broker signed by another CA, publish as another
board, read another board's assignments or model, or push another board off the broker. Mosquitto
drops unauthorized publishes silently (MQTT 3.1.1 has no way to refuse them), so "never arrives"
is checked against a control message the same client sends afterwards on its own topic. Last, a
real round of coordinator and agents through the provisioned broker: the ACL fits the roles.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import queue
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509

from bitfleet.cli.main import main
from bitfleet.protocol import MAX_CHUNK, BrokerAddress, MqttTransport, Topics, split_payload
from fleet.provision import (
    COORDINATOR_USER,
    load_provisioned,
    mosquitto_password_hash,
    provision,
)
from tests.proc_cmdline import CmdlineSampler

TOPICS = Topics(fleet="test")
A, B = "dev0", "dev1"
SILENCE_S = 1.5  # how long a dropped message gets to show up anyway

Inbox = queue.Queue[tuple[str, bytes]]


@pytest.fixture
def connect(secure_mosquitto) -> Iterator[Callable[..., tuple[MqttTransport, Inbox]]]:
    """Log in to the provisioned broker as `user` (a device id or the coordinator)."""
    started: list[MqttTransport] = []
    fleet = secure_mosquitto.fleet

    def make(
        user: str, subscriptions: Sequence[str] = (), client_id: str | None = None, **kw: Any
    ) -> tuple[MqttTransport, Inbox]:
        inbox: Inbox = queue.Queue()
        transport = MqttTransport(
            fleet.url(user),
            client_id or f"test-{user}",
            lambda topic, payload: inbox.put((topic, payload)),
            subscriptions=list(subscriptions),
            ca_file=str(fleet.ca_file),
            **kw,
        )
        transport.start(timeout=10)
        started.append(transport)
        return transport, inbox

    yield make
    for transport in started:
        transport.stop(flush_timeout=1)


def _refused(url: str, ca_file: Path | None, timeout: float = 5) -> str:
    """Try to log in; return the ConnectionError's text (fails the test if the login works)."""
    transport = MqttTransport(url, "intruder", lambda *_: None, ca_file=ca_file and str(ca_file))
    with pytest.raises(ConnectionError) as excinfo:
        transport.start(timeout=timeout)
    return str(excinfo.value)


def _drain(inbox: Inbox, until_topic: str, timeout: float = 10.0) -> list[str]:
    """Topics received up to and including `until_topic`, then for SILENCE_S more."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while until_topic not in seen:
        try:
            seen.append(inbox.get(timeout=max(0.01, deadline - time.monotonic()))[0])
        except queue.Empty:
            pytest.fail(f"control message on {until_topic} never arrived; got {seen}")
    quiet_until = time.monotonic() + SILENCE_S
    while (left := quiet_until - time.monotonic()) > 0:
        try:
            seen.append(inbox.get(timeout=left)[0])
        except queue.Empty:
            break
    return seen


# -- the files (no broker) --


def test_password_hash_matches_mosquitto_passwd() -> None:
    # From `mosquitto_passwd -b` 2.0.11 for password "secret": same salt, same hash.
    entry = (
        "$7$101$6ykE4v8i/L3CRVWa$qxz5Hff/QCQc7MjByglNQTVCwT6n8Qko6bvjIV2k4BtwxFyeZe5xqSPRodLTQ"
        "OzlTt08P2/u90sSa1n5VJSKTA=="
    )
    salt = base64.b64decode(entry.split("$")[3])
    assert mosquitto_password_hash("secret", salt=salt) == entry


def test_provisioned_layout(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    fleet = provision("lab", 3, out, hosts=["fleet.example.org", "10.1.2.3"], port=8884)
    assert list(fleet.devices) == ["dev0", "dev1", "dev2"]
    assert fleet.hosts[:2] == ("fleet.example.org", "10.1.2.3")
    assert load_provisioned(out) == fleet

    secret = ["ca.key", "server.key", "passwd", "coordinator.env", "credentials.json"]
    secret += ["coordinator.password"]
    secret += [f"devices/{d}.{kind}" for d in fleet.devices for kind in ("env", "password")]
    for name in secret:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name

    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fleet.example.org", "localhost"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3",
        "127.0.0.1",
        "::1",
    }

    users = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert set(users) == {COORDINATOR_USER, *fleet.devices}
    for user, entry in users.items():
        _, seven, iterations, salt, digest = entry.split("$")
        password = fleet.devices.get(user, fleet.coordinator_password)
        expected = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations), 64
        )
        assert seven == "7" and base64.b64decode(digest) == expected

    conf = (out / "mosquitto.conf").read_text().splitlines()
    for line in (
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "listener 8884",
        f"cafile {out / 'ca.crt'}",
        f"keyfile {out / 'server.key'}",
        "use_username_as_clientid true",
    ):
        assert line in conf
    assert conf.index("listener 8884") < conf.index("use_username_as_clientid true")
    assert int(next(x for x in conf if x.startswith("max_packet_size")).split()[1]) > MAX_CHUNK

    acl = (out / "acl").read_text().splitlines()
    assert acl.index("user coordinator") < acl.index("topic readwrite bitfleet/lab/#")
    for rule in ("write bitfleet/lab/update/%u", "read bitfleet/lab/model/%u"):
        assert f"pattern {rule}" in acl

    # The env files name the account, never its password, which has a file of its own
    # (docs/security.md#broker-credentials).
    env = (out / "devices" / "dev1.env").read_text()
    assert fleet.public_url("dev1") == "mqtts://dev1@fleet.example.org:8884"
    assert f"BITFLEET_BROKER={fleet.public_url('dev1')}\n" in env
    assert "BITFLEET_FLEET=lab\n" in env
    assert "BITFLEET_AGENT_ARGS=--device-id dev1 --ca-file /etc/bitfleet/ca.crt\n" in env
    coordinator_env = (out / "coordinator.env").read_text()
    assert "BITFLEET_BROKER=mqtts://coordinator@127.0.0.1:8884\n" in coordinator_env
    assert f"--ca-file {out / 'ca.crt'}" in coordinator_env
    for user in [COORDINATOR_USER, *fleet.devices]:
        password = fleet.password(user)
        assert fleet.password_file(user).read_text() == password + "\n"
        assert password not in env + coordinator_env
        assert fleet.address(user) == BrokerAddress(
            fleet.coordinator_host if user == COORDINATOR_USER else "fleet.example.org",
            8884,
            tls=True,
            username=user,
            password=password,
        )
    assert fleet.password_file("dev1") == out / "devices" / "dev1.password"
    assert fleet.password_file(COORDINATOR_USER) == out / "coordinator.password"
    # In-process callers may still have the whole URL.
    assert fleet.url("dev1") == f"mqtts://dev1:{fleet.devices['dev1']}@fleet.example.org:8884"
    assert fleet.coordinator_url == (
        f"mqtts://coordinator:{fleet.coordinator_password}@127.0.0.1:8884"
    )


def test_refuses_to_overwrite_credentials(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    first = provision("lab", 3, out, hosts=["h"])
    with pytest.raises(FileExistsError, match="--force"):
        provision("lab", 1, out, hosts=["h"])
    assert load_provisioned(out) == first  # untouched
    second = provision("lab", 1, out, hosts=["h"], force=True)
    assert second.devices.keys() == {"dev0"} and second.devices != first.devices
    assert sorted(p.name for p in (out / "devices").iterdir()) == ["dev0.env", "dev0.password"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fleet": "a/b"},
        {"fleet": "a b"},
        {"fleet": "#"},
        {"prefix": "bit%ufleet"},
        {"device_prefix": "-x"},
        {"devices": 0},
        {"port": 70000},
        {"hosts": ["bad host"]},
    ],
)
def test_bad_arguments_rejected(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    args = {"fleet": "lab", "devices": 2, "hosts": ["h"], **kwargs}
    with pytest.raises(ValueError):
        provision(args.pop("fleet"), args.pop("devices"), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_cli_provision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fleet"
    argv = ["coordinator", "provision", "--fleet", "lab", "--devices", "2", "--out", str(out)]
    argv += ["--host", "fleet.example.org", "--device-prefix", "pi", "--port", "9883"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in printed
    fleet = load_provisioned(out)
    assert list(fleet.devices) == ["pi0", "pi1"] and fleet.port == 9883
    assert not any(password in printed for password in fleet.devices.values())
    assert main(argv) == 1  # exists: refused
    assert "--force" in capsys.readouterr().err


# -- against the broker --


def test_devices_and_coordinator_log_in_over_tls(connect) -> None:
    coordinator, inbox = connect(COORDINATOR_USER, [TOPICS.all("update")])
    device, _ = connect(A)
    # The largest packet the protocol sends: one full chunk plus its header.
    (chunk,) = split_payload("update", {"round": 0}, os.urandom(MAX_CHUNK))
    device.publish(TOPICS.update(A), chunk, wait=True, timeout=10)
    topic, payload = inbox.get(timeout=10)
    assert (topic, payload) == (TOPICS.update(A), chunk)


def test_unauthenticated_client_refused(secure_mosquitto) -> None:
    fleet = secure_mosquitto.fleet
    why = _refused(f"mqtts://localhost:{fleet.port}", fleet.ca_file)
    assert "refused" in why


def test_wrong_password_refused(secure_mosquitto) -> None:
    fleet = secure_mosquitto.fleet
    assert "refused" in _refused(f"mqtts://{A}:wrong@localhost:{fleet.port}", fleet.ca_file)
    # One board's password is not another's.
    stolen = fleet.devices[B]
    assert "refused" in _refused(f"mqtts://{A}:{stolen}@localhost:{fleet.port}", fleet.ca_file)
    assert "refused" in _refused(f"mqtts://nobody:{stolen}@localhost:{fleet.port}", fleet.ca_file)


def test_device_publishes_only_under_its_own_id(connect) -> None:
    _, inbox = connect(COORDINATOR_USER, ["bitfleet/test/#"])
    device, _ = connect(A)
    forbidden = [TOPICS.update(B), TOPICS.register(B), TOPICS.status(B)]
    # Its own downlink topics are read-only too: a board cannot hand itself a task or a model.
    forbidden += [TOPICS.task(A), TOPICS.assign(A), TOPICS.model(A)]
    forbidden += ["bitfleet/test/update", "bitfleet/other/update/dev0", "elsewhere"]
    for topic in forbidden:
        device.publish(topic, b"forged", wait=True, timeout=5)
    device.publish(TOPICS.register(A), b"mine", wait=True, timeout=5)
    device.publish(TOPICS.status(A), b"mine", wait=True, timeout=5)
    device.publish(TOPICS.update(A), b"control", wait=True, timeout=5)
    seen = _drain(inbox, TOPICS.update(A))
    assert seen == [TOPICS.register(A), TOPICS.status(A), TOPICS.update(A)]


def test_device_reads_only_its_own_downlink(connect) -> None:
    coordinator, _ = connect(COORDINATOR_USER)
    # Retained before the device subscribes: the broker must not hand B's copy to A either.
    coordinator.publish(TOPICS.assign(B), b"for B", retain=True, wait=True, timeout=5)
    _, inbox = connect(
        A, [TOPICS.model(B), TOPICS.task(B), "bitfleet/test/model/#", "bitfleet/test/#", "#"]
    )
    for kind in ("model", "task", "assign"):
        coordinator.publish(TOPICS.topic(kind, B), b"for B", wait=True, timeout=5)
        coordinator.publish(TOPICS.topic(kind, "dev2"), b"for dev2", wait=True, timeout=5)
    coordinator.publish(TOPICS.update(B), b"B's update", wait=True, timeout=5)
    coordinator.publish(TOPICS.task(A), b"for A", wait=True, timeout=5)
    coordinator.publish(TOPICS.model(A), b"for A", wait=True, timeout=5)
    seen = _drain(inbox, TOPICS.model(A))
    assert set(seen) == {TOPICS.task(A), TOPICS.model(A)}


def test_device_cannot_take_over_another_devices_session(connect) -> None:
    _, inbox = connect(B, [TOPICS.task(B)], client_id=f"bitfleet-agent-{B}")
    coordinator, _ = connect(COORDINATOR_USER)
    # A logs in under B's client id; with use_username_as_clientid the broker renames it.
    intruder, _ = connect(A, client_id=f"bitfleet-agent-{B}")
    coordinator.publish(TOPICS.task(B), b"still there?", wait=True, timeout=5)
    assert inbox.get(timeout=5) == (TOPICS.task(B), b"still there?")
    assert intruder.is_connected


def test_plaintext_connection_to_tls_port_fails(secure_mosquitto) -> None:
    fleet = secure_mosquitto.fleet
    url = fleet.url(A).replace("mqtts://", "mqtt://", 1)
    _refused(url, None, timeout=2)
    # And at the byte level: an MQTT CONNECT gets no CONNACK, the broker hangs up.
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=5) as sock:
        connect_packet = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])
        sock.sendall(connect_packet)
        reply = b""
        try:
            while chunk := sock.recv(64):
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert not reply.startswith(b"\x20\x02")


def test_broker_signed_by_another_ca_is_not_trusted(secure_mosquitto, tmp_path: Path) -> None:
    other = provision("other", 1, tmp_path / "other", hosts=["localhost"])
    fleet = secure_mosquitto.fleet
    why = _refused(fleet.url(A), other.ca_file)
    assert "certificate verify failed" in why
    # Without a CA file the system's trust store is used: it does not know the fleet's CA.
    _refused(fleet.url(A), None)
    # The real CA works, so the failure above is the CA's, not the login's.
    transport = MqttTransport(fleet.url(A), "ok", lambda *_: None, ca_file=str(fleet.ca_file))
    transport.start(timeout=5)
    transport.stop()


def test_server_certificate_checked_against_the_host_name(secure_mosquitto) -> None:
    fleet = secure_mosquitto.fleet
    context = ssl.create_default_context(cafile=str(fleet.ca_file))
    address = ("127.0.0.1", fleet.port)
    with (
        socket.create_connection(address, timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with (
        socket.create_connection(address, timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        context.wrap_socket(sock, server_hostname="fleet.example.org")


# -- the roles themselves over the provisioned broker --


def _tiny_fmnist(folder: Path) -> None:
    """A Fashion-MNIST look-alike: each class a bright block at its own place."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 100)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        for c in range(10):
            r, col = divmod(c, 5)
            x[y == c, r * 14 : r * 14 + 14, col * 5 : col * 5 + 5] += 180
        for kind, array in (("images-idx3", x), ("labels-idx1", y)):
            header = bytes([0, 0, 0x08, array.ndim])
            header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())


def test_federation_over_the_provisioned_broker(
    secure_mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coordinator and agents, each with its own account, through TLS and the ACL: one round,
    and each board gets its model (chunks of a real ONNX file under max_packet_size). The agents
    get their passwords as the units do, never on the command line: A the URL and password from
    the environment, B `--broker` without password and `--password-file`; all the while no
    process shows a password in /proc/PID/cmdline."""
    from coordinator.config import job_config_from_dict
    from coordinator.server import Coordinator

    fleet = secure_mosquitto.fleet
    _tiny_fmnist(tmp_path / "data")
    monkeypatch.setenv("BITFLEET_DATA_DIR", str(tmp_path / "data"))
    for name in ("BITFLEET_BROKER", "BITFLEET_BROKER_PASSWORD", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    connect = {
        A: (
            [],
            {"BITFLEET_BROKER": fleet.public_url(A), "BITFLEET_BROKER_PASSWORD": fleet.password(A)},
        ),
        B: (["--broker", fleet.public_url(B), "--password-file", str(fleet.password_file(B))], {}),
    }
    agents = []
    for i, device in enumerate([A, B]):
        args, env = connect[device]
        cmd = [
            sys.executable, "-m", "bitfleet", "agent", "run", *args,
            "--ca-file", str(fleet.ca_file), "--device-id", device, "--fleet", fleet.fleet,
            "--data", f"fashion-mnist:{i}/2", "--partition", "iid", "--profile", "rpi5",
            "--out-dir", str(tmp_path / device), "--threads", "1", "--no-step-measure",
            "--exit-after-model",
        ]  # fmt: skip
        log = (tmp_path / f"{device}.log").open("w")
        agents.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        )
    cfg = job_config_from_dict(
        {
            "job": {"name": "t", "fleet": fleet.fleet, "state_dir": str(tmp_path / "state")},
            "training": {"rounds": 1, "local_epochs": 1.0, "batch_size": 32},
            "rounds": {"min_devices": 2, "deadline_s": 60.0, "register_timeout_s": 60.0},
            "allocation": {"strategy": "qat", "bits": 4},
            "deploy": {"bits": [8]},
        },
        source="test",
    )
    secrets = [fleet.coordinator_password, *fleet.devices.values()]

    def is_agent(line: str) -> bool:  # this test's agents: their --out-dir lies in tmp_path
        return " agent run " in line and str(tmp_path) in line

    try:
        with CmdlineSampler(lambda: secrets, is_agent) as sampler:
            coordinator = Coordinator(cfg, fleet.coordinator_url, ca_file=str(fleet.ca_file))
            reports = coordinator.run().reports
            codes = [p.wait(timeout=60) for p in agents]
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "".join((tmp_path / f"{d}.log").read_text() for d in (A, B))
    assert codes == [0, 0], logs
    # Both agents were seen (a forked child between fork and exec may show up as well).
    assert {p.pid for p in agents} <= set(sampler.watched), sampler.watched
    assert sampler.leaks == []
    assert "carries a password" not in logs  # neither agent fell back to a URL's password
    assert [sorted(r.received) for r in reports] == [[A, B]]
    for device in (A, B):
        assert len(list((tmp_path / device).glob("*.onnx"))) == 1
