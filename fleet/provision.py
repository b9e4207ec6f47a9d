"""Credentials and broker configuration for one fleet: `bitfleet coordinator provision`.

A fleet's broker is reachable by strangers' devices, so it runs with TLS only, no anonymous access,
a password per board, and an ACL under which a board may publish only under its own id and read only
its own assignments, tasks and model (docs/security.md#the-acl). Writing those files by hand
(openssl, mosquitto_passwd, an ACL) is where fleets get it wrong, so this module writes all of them
in one step, into one directory:

    ca.crt, ca.key            a private CA; the key is needed again only to issue certificates
    server.crt, server.key    the broker's certificate (SANs: --host names, localhost, loopback)
    passwd                    Mosquitto 2 password file, PBKDF2-SHA512 (`$7$`) entries
    acl                       coordinator: everything under <prefix>/<fleet>/#; devices: `%u` rules
    mosquitto.conf            TLS listener, password_file, acl_file, persistence under data/
    coordinator.env           BITFLEET_BROKER (no password) and --ca-file for its systemd unit
    coordinator.password      the coordinator's password, for the unit's LoadCredential=
    devices/<id>.env          one agent env file per board (deploy/README.md, /etc/bitfleet/)
    devices/<id>.password     each board's password, for the agent unit's LoadCredential=
    credentials.json          every password in one place, for tools (0600, like every secret)

Passwords live in files of their own, never in a URL: a URL ends up on command lines, where every
local user can read it (docs/security.md#broker-credentials).

The certificates come from `certificates`, the Mosquitto files from `broker_config`; the
command line is `provision_cli` (offered as `bitfleet coordinator provision` through the
`bitfleet.coordinator_actions` entry point).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bitfleet.protocol import BrokerAddress, Topics, parse_broker_url, validate_device_id

from .broker_config import (
    COORDINATOR_USER,
    PBKDF2_ITERATIONS,
    acl_text,
    mosquitto_conf_text,
    mosquitto_password_hash,
)
from .certificates import _cert_pem, _key_pem, make_ca, make_server_cert

__all__ = [
    "COORDINATOR_USER",
    "PBKDF2_ITERATIONS",
    "Provisioned",
    "acl_text",
    "default_broker_user",
    "load_provisioned",
    "mosquitto_conf_text",
    "mosquitto_password_hash",
    "provision",
]

#: Where the deployed agent expects the CA (deploy/README.md, section 3).
AGENT_CA_PATH = "/etc/bitfleet/ca.crt"
#: Where the units' LoadCredential= reads each role's password (deploy/systemd/*.service).
AGENT_PASSWORD_PATH = "/etc/bitfleet/broker-password"
COORDINATOR_PASSWORD_PATH = "/etc/bitfleet/coordinator-password"

#: Every file `provision` writes at the top of DIR; any of them present means DIR is in use.
OUTPUT_FILES = (
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "passwd",
    "acl",
    "mosquitto.conf",
    "coordinator.env",
    "coordinator.password",
    "credentials.json",
)

_LEVEL = re.compile(r"[A-Za-z0-9_.-]+")  # a topic level safe inside ACL and config lines
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Provisioned:
    """What `provision` wrote: where, for which fleet, and every account's password."""

    out: Path
    fleet: str
    prefix: str
    hosts: tuple[str, ...]
    port: int
    coordinator_host: str
    coordinator_password: str = field(repr=False)
    devices: dict[str, str] = field(repr=False)  # device id -> password

    @property
    def conf(self) -> Path:
        return self.out / "mosquitto.conf"

    @property
    def ca_file(self) -> Path:
        return self.out / "ca.crt"

    def password(self, user: str) -> str:
        """The password of `user` (a device id or COORDINATOR_USER)."""
        return self.coordinator_password if user == COORDINATOR_USER else self.devices[user]

    def password_file(self, user: str) -> Path:
        """The 0600 file holding `user`'s password: what `--password-file` and the units'
        LoadCredential= read, so the password stays off every command line."""
        if user == COORDINATOR_USER:
            return self.out / "coordinator.password"
        self.devices[user]  # KeyError for an unknown device, like `password`
        return self.out / "devices" / f"{user}.password"

    def public_url(self, user: str, host: str | None = None) -> str:
        """`mqtts://user@host:port`: the account without its password, safe for argv and logs."""
        self.password(user)  # KeyError for an unknown device
        return f"mqtts://{user}@{self._host(user, host)}:{self.port}"

    def address(self, user: str, host: str | None = None) -> BrokerAddress:
        """Where and how `user` logs in, password included, for callers in this process."""
        address = parse_broker_url(self.public_url(user, host))
        return dataclasses.replace(address, password=self.password(user))

    def url(self, user: str, host: str | None = None) -> str:
        """`mqtts://user:password@host:port`, for callers in this process only: on a command
        line the password would be readable by every local user (use `public_url` there)."""
        return f"mqtts://{user}:{self.password(user)}@{self._host(user, host)}:{self.port}"

    def _host(self, user: str, host: str | None) -> str:
        host = host or (self.coordinator_host if user == COORDINATOR_USER else self.hosts[0])
        return _url_host(host)

    @property
    def coordinator_url(self) -> str:
        return self.url(COORDINATOR_USER)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_level(what: str, value: str) -> str:
    if not _LEVEL.fullmatch(value):
        raise ValueError(f"{what} {value!r}: use letters, digits, '_', '.' and '-' only")
    return value


def _check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name")
    return host


def _check_path(path: Path) -> None:
    # A config value runs to the end of its line; a newline would start a new directive.
    if any(c in str(path) for c in "\n\r\0"):
        raise ValueError(f"output directory {str(path)!r} contains a line break")


def _new_password() -> str:
    # URL-safe alphabet: goes into mqtts://user:password@host without quoting.
    return secrets.token_urlsafe(24)


def _agent_env(p: Provisioned, device: str, agent_ca_path: str) -> str:
    return (
        f"# bitfleet agent settings for device {device} of fleet {p.fleet!r}.\n"
        "# Install as /etc/bitfleet/agent.env (mode 0640, root:bitfleet), the fleet's ca.crt\n"
        f"# as {agent_ca_path} and devices/{device}.password as {AGENT_PASSWORD_PATH}\n"
        "# (mode 0600, root), which the unit hands over with LoadCredential=; see\n"
        "# deploy/README.md. The password is not in this file, nor on the command line.\n"
        f"BITFLEET_BROKER={p.public_url(device)}\n"
        "BITFLEET_DATA=/srv/bitfleet/data\n"
        f"BITFLEET_FLEET={p.fleet}\n"
        "# Device id = MQTT user name: the broker's ACL lets this board speak only for itself.\n"
        f"BITFLEET_AGENT_ARGS=--device-id {device} --ca-file {agent_ca_path}\n"
    )


def _coordinator_env(p: Provisioned) -> str:
    return (
        f"# bitfleet coordinator settings for fleet {p.fleet!r}: /etc/bitfleet/coordinator.env\n"
        "# (mode 0640, root:bitfleet), and coordinator.password as\n"
        f"# {COORDINATOR_PASSWORD_PATH} (mode 0600, root), which the unit hands over with\n"
        "# LoadCredential=; see deploy/README.md.\n"
        f"BITFLEET_BROKER={p.public_url(COORDINATOR_USER)}\n"
        f"BITFLEET_COORDINATOR_ARGS=--ca-file {p.ca_file}\n"
    )


# -- writing --


def _write(path: Path, data: str | bytes, mode: int) -> None:
    """Write `path` with exactly `mode`, also when it existed with wider permissions."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "wb") as file:  # the mode is right before the first byte is written
        os.fchmod(fd, mode)
        file.write(raw)


def _existing_credentials(out: Path) -> list[str]:
    found = [name for name in OUTPUT_FILES if (out / name).exists()]
    devices = out / "devices"
    if devices.is_dir() and (any(devices.glob("*.env")) or any(devices.glob("*.password"))):
        found.append("devices/")
    return found


def _lookup_user(name: str) -> tuple[int, int]:
    """(uid, gid) of `name`; changing owners needs root, so say so before writing anything."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--broker-user {name!r}: no such user") from None
    if os.geteuid() != 0:
        raise PermissionError(f"--broker-user {name!r}: only root can hand files to another user")
    return entry.pw_uid, entry.pw_gid


def default_broker_user() -> str | None:
    """`mosquitto` when run as root and that user exists (Debian's package makes it), else None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam("mosquitto").pw_name
    except KeyError:
        return None


def _default_hosts() -> list[str]:
    fqdn = socket.getfqdn()
    return [fqdn] if fqdn and fqdn not in _LOOPBACK and _HOSTNAME.fullmatch(fqdn) else []


def provision(
    fleet: str,
    devices: int,
    out: str | os.PathLike[str],
    *,
    hosts: Iterable[str] = (),
    prefix: str = "bitfleet",
    device_prefix: str = "dev",
    port: int = 8883,
    bind: str | None = None,
    days: int = 1825,
    agent_ca_path: str = AGENT_CA_PATH,
    broker_user: str | None = None,
    force: bool = False,
) -> Provisioned:
    """Write a fleet's CA, broker certificate, accounts, ACL and configs into `out`.

    Devices are `<device_prefix>0` .. `<device_prefix><devices-1>`. `hosts` are the names the
    boards use to reach the broker (default: this machine's FQDN); localhost and the loopback
    addresses are always added, for the coordinator beside the broker. `broker_user` (only as
    root) becomes the owner of what Mosquitto reads and writes (server key, passwd, acl, data/):
    Mosquitto started by root drops to that user before it opens them. Raises FileExistsError
    if `out` already holds credentials, unless `force`, and ValueError for bad arguments.
    """
    Topics(prefix=prefix, fleet=fleet)  # the same rules as the topics the roles use
    for level in prefix.split("/"):
        _check_level("prefix level", level)
    _check_level("fleet", fleet)
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    if bind is not None:
        _check_host(bind)
    device_ids = [validate_device_id(f"{device_prefix}{i}") for i in range(devices)]
    if COORDINATOR_USER in device_ids:
        raise ValueError(f"device id {COORDINATOR_USER!r} is the coordinator's account")
    owner = _lookup_user(broker_user) if broker_user else None
    given = [_check_host(h) for h in hosts] or _default_hosts()
    all_hosts = tuple(dict.fromkeys([*given, *_LOOPBACK]))

    out_path = Path(out).resolve()
    _check_path(out_path)
    found = _existing_credentials(out_path) if out_path.exists() else []
    if found and not force:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise FileExistsError(
            f"{out_path} already holds credentials ({shown}); "
            "pass --force to replace them (every board then needs its new env file)"
        )
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "data").mkdir(mode=0o700, exist_ok=True)
    device_dir = out_path / "devices"
    device_dir.mkdir(mode=0o700, exist_ok=True)
    for stale in [*device_dir.glob("*.env"), *device_dir.glob("*.password")]:
        stale.unlink()  # only reached with force: old boards' files

    loopback_bind = bind is None or bind in ("0.0.0.0", "::", *_LOOPBACK)
    result = Provisioned(
        out=out_path,
        fleet=fleet,
        prefix=prefix,
        hosts=all_hosts,
        port=port,
        coordinator_host="127.0.0.1" if loopback_bind else bind,
        coordinator_password=_new_password(),
        devices={device: _new_password() for device in device_ids},
    )

    ca_key, ca_cert = make_ca(fleet, days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, all_hosts, fleet, days)
    _write(out_path / "ca.key", _key_pem(ca_key), 0o600)
    _write(out_path / "ca.crt", _cert_pem(ca_cert), 0o644)
    _write(out_path / "server.key", _key_pem(server_key), 0o600)
    _write(out_path / "server.crt", _cert_pem(server_cert), 0o644)

    accounts = {COORDINATOR_USER: result.coordinator_password, **result.devices}
    passwd = "".join(f"{u}:{mosquitto_password_hash(pw)}\n" for u, pw in accounts.items())
    _write(out_path / "passwd", passwd, 0o600)
    _write(out_path / "acl", acl_text(prefix, fleet), 0o644)
    conf = mosquitto_conf_text(out_path, fleet, port, bind, broker_user, len(device_ids))
    _write(out_path / "mosquitto.conf", conf, 0o644)
    _write(out_path / "coordinator.env", _coordinator_env(result), 0o600)
    for user in accounts:
        _write(result.password_file(user), accounts[user] + "\n", 0o600)
    for device in device_ids:
        _write(device_dir / f"{device}.env", _agent_env(result, device, agent_ca_path), 0o600)
    credentials = {
        "fleet": fleet,
        "prefix": prefix,
        "hosts": list(all_hosts),
        "port": port,
        "coordinator_host": result.coordinator_host,
        "coordinator": {"user": COORDINATOR_USER, "password": result.coordinator_password},
        "devices": result.devices,
    }
    _write(out_path / "credentials.json", json.dumps(credentials, indent=2) + "\n", 0o600)
    if owner is not None:
        for name in ("server.key", "passwd", "acl", "data"):
            os.chown(out_path / name, *owner)
    return result


def load_provisioned(out: str | os.PathLike[str]) -> Provisioned:
    """Read back what `provision` wrote to `out` (e.g. for `bitfleet demo --secure`)."""
    out_path = Path(out).resolve()
    data = json.loads((out_path / "credentials.json").read_text(encoding="utf-8"))
    return Provisioned(
        out=out_path,
        fleet=data["fleet"],
        prefix=data["prefix"],
        hosts=tuple(data["hosts"]),
        port=int(data["port"]),
        coordinator_host=data["coordinator_host"],
        coordinator_password=data["coordinator"]["password"],
        devices=dict(data["devices"]),
    )
