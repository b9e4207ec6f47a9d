"""Where a process finds its broker and its password (docs/security.md#broker-credentials).

A password on the command line (`--broker mqtts://dev3:PASSWORD@host`) is visible to every local
user in `ps` and `/proc/PID/cmdline`, and stays in shell history. So the password comes from a
file or the environment instead, and the URL names only the broker and the account. In order:

1. `--password-file PATH`: the file holds the password (one trailing newline is dropped);
2. `$BITFLEET_BROKER_PASSWORD`;
3. systemd's credential `broker-password` (`LoadCredential=broker-password:/etc/bitfleet/...`),
   read from `$CREDENTIALS_DIRECTORY/broker-password`;
4. the URL's own password, which still works but logs a warning.

The user name comes from the URL (`mqtts://dev0@host:8883`), else `$BITFLEET_BROKER_USERNAME`;
the URL itself from `--broker`, else `$BITFLEET_BROKER`, else the caller's default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from bitfleet.protocol.transport import BrokerAddress, parse_broker_url

__all__ = [
    "BROKER_ENV",
    "CREDENTIAL_NAME",
    "PASSWORD_ENV",
    "PASSWORD_FILE_HELP",
    "USERNAME_ENV",
    "read_password_file",
    "resolve_broker",
]

BROKER_ENV = "BITFLEET_BROKER"
PASSWORD_ENV = "BITFLEET_BROKER_PASSWORD"
USERNAME_ENV = "BITFLEET_BROKER_USERNAME"
#: The name under which systemd's LoadCredential= hands over the password.
CREDENTIAL_NAME = "broker-password"

#: `--password-file`'s help in every command that connects, so they explain the same order.
PASSWORD_FILE_HELP = (
    f"file holding the broker password; else ${PASSWORD_ENV}, else systemd's credential "
    f"{CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY), else the URL's own (warned about: every local "
    f"user sees a command line); user name from the URL or ${USERNAME_ENV}"
)

log = logging.getLogger(__name__)


def read_password_file(path: str | os.PathLike[str], what: str = "--password-file") -> str:
    """The password in `path`, without its trailing newline; ValueError saying what is wrong.

    A missing, unreadable or empty file is an error rather than "no password": the operator
    named it, and logging in without it would fail later with a vaguer broker refusal.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path}: a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{what} {path}: not readable by this user") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"{what} {path}: empty, expected the broker password")
    if "\n" in password or "\r" in password:
        raise ValueError(f"{what} {path}: more than one line, expected only the password")
    return password


def _password(
    password_file: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> tuple[str | None, str]:
    """(password, where it came from) from the sources above the URL, or (None, "")."""
    if password_file is not None:
        return read_password_file(password_file), f"--password-file {password_file}"
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV], f"${PASSWORD_ENV}"
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = Path(credentials) / CREDENTIAL_NAME
        if path.exists():
            return read_password_file(path, "systemd credential"), f"systemd credential {path}"
    return None, ""


def resolve_broker(
    url: str | None,
    password_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    *,
    default: str | None = None,
) -> BrokerAddress:
    """The broker to connect to and the login, from the sources in the module docstring.

    `url` is `--broker` (None when not given). Raises ValueError, with a one-line message, for
    a bad URL, a bad password file, no URL at all, or a password without a user name.
    """
    from_env = not url
    url = url or environ.get(BROKER_ENV) or default
    if not url:
        raise ValueError(f"no broker: pass --broker URL or set ${BROKER_ENV}")
    address = parse_broker_url(url)
    username = address.username or environ.get(USERNAME_ENV) or None
    password, source = _password(password_file, environ)
    if address.password is not None:
        where = (
            f"${BROKER_ENV}, which is easily copied onto a command line"
            if from_env
            else "--broker, where every local user can read it (ps, /proc/PID/cmdline) and "
            "shell history keeps it"
        )
        then = f"; using the one from {source}" if password is not None else ""
        log.warning(
            "the broker URL carries a password in %s%s; name only the account in the URL and "
            "pass the password with --password-file, $%s or the systemd credential %s "
            "(docs/security.md#broker-credentials)",
            where,
            then,
            PASSWORD_ENV,
            CREDENTIAL_NAME,
        )
        if password is None:
            password, source = address.password, "the URL"
    if password is not None and username is None:
        raise ValueError(
            f"a broker password (from {source}) needs a user name: put it in the URL "
            f"(mqtts://USER@host:port) or in ${USERNAME_ENV}"
        )
    resolved = dataclasses.replace(address, username=username, password=password)
    if password is not None:
        log.info("broker %s: password from %s", resolved, source)
    return resolved
