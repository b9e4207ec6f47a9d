"""Where the broker password comes from (docs/security.md#broker-credentials): each source, their
order, the warning for a password in the URL, and a clear one-line error for every bad file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bitfleet.cli.main import main
from bitfleet.protocol import BrokerAddress, parse_broker_url, resolve_broker

URL = "mqtts://dev0@broker.example:8883"


def _file(path: Path, text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return str(path)


@pytest.fixture
def credentials_dir(tmp_path: Path) -> Path:
    """What systemd's LoadCredential=broker-password:... makes for a unit."""
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "broker-password").write_text("from-systemd\n")
    return folder


def test_url_without_password_and_no_source(caplog: pytest.LogCaptureFixture) -> None:
    address = resolve_broker(URL, environ={})
    assert address == BrokerAddress("broker.example", 8883, True, "dev0", None)
    assert not caplog.records


def test_each_source_in_order(tmp_path: Path, credentials_dir: Path) -> None:
    password_file = _file(tmp_path / "pw", "from-file\n")
    env = {"BITFLEET_BROKER_PASSWORD": "from-env", "CREDENTIALS_DIRECTORY": str(credentials_dir)}
    url = "mqtts://dev0:from-url@broker.example:8883"
    assert resolve_broker(url, password_file, env).password == "from-file"
    assert resolve_broker(url, None, env).password == "from-env"
    del env["BITFLEET_BROKER_PASSWORD"]
    assert resolve_broker(url, None, env).password == "from-systemd"
    (credentials_dir / "broker-password").unlink()  # a unit with other credentials only
    assert resolve_broker(url, None, env).password == "from-url"
    assert resolve_broker(URL, None, env).password is None


def test_empty_password_variable_counts_as_unset() -> None:
    # `BITFLEET_BROKER_PASSWORD=` in an env file (systemd's EnvironmentFile) sets it empty.
    address = resolve_broker(URL, environ={"BITFLEET_BROKER_PASSWORD": "", "BITFLEET_BROKER": ""})
    assert address.password is None


def test_password_in_the_url_works_but_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        address = resolve_broker("mqtts://dev0:s3cret@broker.example", environ={})
    assert (address.username, address.password, address.port) == ("dev0", "s3cret", 8883)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    for why in ("ps", "/proc/PID/cmdline", "shell history", "--password-file"):
        assert why in message
    assert "s3cret" not in message


def test_a_better_source_wins_over_the_url_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password_file = _file(tmp_path / "pw", "from-file")
    with caplog.at_level(logging.WARNING):
        address = resolve_broker("mqtt://dev0:old@h", password_file, environ={})
    assert address.password == "from-file"
    assert "using the one from --password-file" in caplog.text


def test_broker_url_from_the_environment_or_the_default(caplog: pytest.LogCaptureFixture) -> None:
    env = {"BITFLEET_BROKER": URL, "BITFLEET_BROKER_PASSWORD": "pw"}
    assert resolve_broker(None, environ=env) == BrokerAddress(
        "broker.example", 8883, True, "dev0", "pw"
    )
    assert resolve_broker("mqtt://dev1@other", environ=env).host == "other"  # --broker wins
    assert str(resolve_broker(None, environ={}, default="mqtt://127.0.0.1:1883")) == (
        "mqtt://127.0.0.1:1883"
    )
    with pytest.raises(ValueError, match=r"pass --broker URL or set \$BITFLEET_BROKER"):
        resolve_broker(None, environ={})
    with caplog.at_level(logging.WARNING):
        resolve_broker(None, environ={"BITFLEET_BROKER": "mqtt://u:p@h"})
    assert "$BITFLEET_BROKER" in caplog.text


def test_user_name_from_the_url_else_the_environment() -> None:
    env = {"BITFLEET_BROKER_USERNAME": "dev7", "BITFLEET_BROKER_PASSWORD": "pw"}
    assert resolve_broker("mqtts://h", environ=env).username == "dev7"
    assert resolve_broker(URL, environ=env).username == "dev0"
    with pytest.raises(ValueError, match="needs a user name.*BITFLEET_BROKER_USERNAME"):
        resolve_broker("mqtts://h", environ={"BITFLEET_BROKER_PASSWORD": "pw"})


@pytest.mark.parametrize(
    ("content", "password"),
    [("pw\n", "pw"), ("pw", "pw"), ("pw\r\n", "pw"), (" pw with spaces \n", " pw with spaces ")],
)
def test_password_file_drops_only_the_line_end(tmp_path: Path, content: str, password: str) -> None:
    assert resolve_broker(URL, _file(tmp_path / "pw", content), {}).password == password


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "no such file"),
        ("", "empty"),
        ("\n", "empty"),
        ("one\ntwo\n", "more than one line"),
        (b"\xff\xfe", "not UTF-8"),
        ("dir", "a directory"),
    ],
)
def test_bad_password_file_is_a_clear_error(
    tmp_path: Path, content: str | bytes | None, why: str
) -> None:
    path = tmp_path / "pw"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        _file(path, content)
    with pytest.raises(ValueError, match=f"--password-file {path}: {why}"):
        resolve_broker(URL, str(path), {})


def test_unreadable_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pw"
    _file(path, "pw")

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")  # what mode 0600 of another user gives

    monkeypatch.setattr(Path, "read_text", refuse)  # chmod 0 alone does not stop root
    with pytest.raises(ValueError, match="not readable by this user"):
        resolve_broker(URL, str(path), {})


def test_empty_systemd_credential_is_an_error(credentials_dir: Path) -> None:
    (credentials_dir / "broker-password").write_text("")
    env = {"CREDENTIALS_DIRECTORY": str(credentials_dir)}
    with pytest.raises(ValueError, match="systemd credential .*broker-password: empty"):
        resolve_broker(URL, environ=env)


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="scheme must be mqtt:// or mqtts://"):
        resolve_broker("http://h", environ={})


def test_the_address_never_shows_the_password() -> None:
    address = resolve_broker(URL, environ={"BITFLEET_BROKER_PASSWORD": "s3cret"})
    assert "s3cret" not in str(address) + repr(address)
    assert parse_broker_url(address) is address  # what the coordinator and agent accept


@pytest.mark.parametrize(
    "argv",
    [
        ["agent", "run", "--broker", URL, "--data", "fashion-mnist:0/2"],
        ["coordinator", "serve", "--config", "job.toml", "--broker", URL],
    ],
)
def test_cli_reports_a_bad_password_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    (tmp_path / "job.toml").write_text(f'[job]\nstate_dir = "{tmp_path / "state"}"\n')
    argv = [a.replace("job.toml", str(tmp_path / "job.toml")) for a in argv]
    missing = tmp_path / "nope"
    assert main([*argv, "--password-file", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"bitfleet: error: --password-file {missing}: no such file\n"
    assert not (tmp_path / "state").exists()  # found before anything was set up
