"""What Mosquitto reads for one fleet: password file hashes, the ACL, mosquitto.conf.

Written by `provision` (fleet/provision.py) into a fleet's directory. Password hashes are
computed here rather than by `mosquitto_passwd`, which the server that provisions may not have
installed; the tests check them against a real broker.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

from bitfleet.protocol import Topics

#: The coordinator's MQTT account; devices are named by their device ids.
COORDINATOR_USER = "coordinator"

#: Mosquitto 2's own default. Passwords here are 192-bit random tokens, so a higher count adds no
#: safety, while every connect costs the single-threaded broker one PBKDF2 run (1000 boards
#: reconnecting after a broker restart).
PBKDF2_ITERATIONS = 101

#: Big enough for one 1 MiB chunk plus its <= 64 KiB header (bitfleet.protocol.chunks).
MAX_PACKET_SIZE = 2 * 1024 * 1024

#: Bytes Mosquitto queues for one client that is not keeping up (the coordinator during an
#: upload burst): a round's updates of a large model fit, a flood cannot exhaust the broker.
MAX_QUEUED_BYTES = 1024 * 1024 * 1024

_SALT_BYTES = 12  # what mosquitto_passwd uses


# -- passwords --


def mosquitto_password_hash(
    password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """A Mosquitto 2 password file hash: `$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>`."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


# -- broker configuration --


def acl_text(prefix: str, fleet: str, coordinator_user: str = COORDINATOR_USER) -> str:
    """The Mosquitto ACL: the coordinator may do anything in the fleet, a device only its own.

    `pattern` rules apply to every user, with `%u` the user name, which is the device id: that
    is what stops one board from speaking for another or reading another's model. Unauthorized
    publishes are dropped silently by Mosquitto (MQTT 3.1.1 has no way to refuse them).
    """
    base = Topics(prefix=prefix, fleet=fleet).base
    lines = [
        f"# bitfleet fleet {fleet!r}: written by `bitfleet coordinator provision`.",
        "# No rule before the first `user` line: anonymous clients (refused anyway) get nothing.",
        "",
        f"user {coordinator_user}",
        f"topic readwrite {base}/#",
        "",
        "# Every other account is a device; its user name is its device id (%u).",
        *(f"pattern write {base}/{kind}/%u" for kind in ("register", "update", "timing")),
        f"pattern readwrite {base}/status/%u",
        *(f"pattern read {base}/{kind}/%u" for kind in ("assign", "task", "model", "candidate")),
    ]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(
    out: Path,
    fleet: str,
    port: int,
    bind: str | None = None,
    user: str | None = None,
    devices: int = 0,
) -> str:
    """mosquitto.conf for the files in `out` (absolute paths: Mosquitto may run elsewhere).

    `user` is who Mosquitto runs as when started by root (its own default is `mosquitto`).
    """
    out = out.resolve()
    listener = f"listener {port} {bind}" if bind else f"listener {port}"
    run_as = f"user {user}\n" if user else ""
    return (
        f"# Mosquitto 2 configuration for bitfleet fleet {fleet!r}, written by\n"
        "# `bitfleet coordinator provision`. Start it with:\n"
        f"#   mosquitto -c {out / 'mosquitto.conf'}\n"
        "# TLS only; every client logs in and may use only its own topics (see acl).\n"
        f"{run_as}"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {out / 'passwd'}\n"
        f"acl_file {out / 'acl'}\n"
        "# Retained status and queued QoS 1 messages survive a broker restart.\n"
        "persistence true\n"
        f"persistence_location {out / 'data'}/\n"
        "# One chunk is at most 1 MiB of data plus a 64 KiB header; anything larger is refused.\n"
        f"max_packet_size {MAX_PACKET_SIZE}\n"
        "# Every board answers a round at once: the coordinator's queue must hold one update's\n"
        "# chunks from each (Mosquitto's default of 1000 would drop some in a larger fleet),\n"
        "# and a burst one board floods it with (Mosquitto has no per-client rate limit), so\n"
        "# the queue is long and bounded in bytes instead (docs/security.md#threat-model).\n"
        f"max_queued_messages {max(20000, 16 * devices)}\n"
        f"max_queued_bytes {MAX_QUEUED_BYTES}\n"
        "\n"
        f"{listener}\n"
        f"cafile {out / 'ca.crt'}\n"
        f"certfile {out / 'server.crt'}\n"
        f"keyfile {out / 'server.key'}\n"
        "tls_version tlsv1.2\n"
        "# The client id is the user name, so no board can take over another's session. A\n"
        "# listener option: above the `listener` line it would open a plaintext port 1883.\n"
        "use_username_as_clientid true\n"
    )
