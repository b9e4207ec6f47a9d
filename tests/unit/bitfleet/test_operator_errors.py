"""Mistakes an operator makes at start-up end in one line on stderr and a non-zero exit, never a
traceback (unless -v), and before anything connects to the broker: a state_dir that is a file,
a checkpoint that is not one, an --out under a file, data that are not where the job says."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitfleet.cli.main import main
from bitfleet.data import fashion_mnist
from tests.tiny_fmnist import make_tiny_fmnist

# Nothing listens here: a command that got as far as connecting would fail with another message.
BROKER = "mqtt://127.0.0.1:9"


@pytest.fixture(autouse=True)
def no_data_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the data a test names exist: no $BITFLEET_DATA_DIR, Debian package or download."""
    monkeypatch.delenv("BITFLEET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    for name in ("BITFLEET_BROKER", "BITFLEET_BROKER_PASSWORD", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `bitfleet argv`; assert exit 1 and a single error line; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert err.startswith("bitfleet: error: ") and err.count("\n") == 1, err
    assert "cannot connect" not in err and "refused" not in err
    return err


def _job(tmp_path: Path, state_dir: Path, data_dir: Path | None = None) -> str:
    data = f'[data]\ndata_dir = "{data_dir}"\n' if data_dir else ""
    (tmp_path / "job.toml").write_text(f'[job]\nstate_dir = "{state_dir}"\n{data}')
    return str(tmp_path / "job.toml")


def _serve(job: str) -> list[str]:
    return ["coordinator", "serve", "--config", job, "--broker", BROKER]


def test_state_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    data = make_tiny_fmnist(tmp_path / "data", n_train=20, n_test=10)
    job = _job(tmp_path, state, data)
    err = _one_line_error(capsys, _serve(job))
    assert f"state_dir {state}: {state} is a file, not a directory" in err
    nested = _job(tmp_path, state / "job1", data)
    assert f"{state} is a file, not a directory" in _one_line_error(capsys, _serve(nested))
    with pytest.raises(ValueError, match="is a file"):  # -v: the traceback, for a bug report
        main(["-v", *_serve(job)])


def test_state_store_that_is_not_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite").write_bytes(b"garbage" * 100)
    data = make_tiny_fmnist(tmp_path / "data", n_train=20, n_test=10)
    err = _one_line_error(capsys, _serve(_job(tmp_path, state, data)))
    assert f"cannot open the job's state store {state / 'state.sqlite'}" in err


def test_coordinator_without_its_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "srv" / "fashion-mnist"
    state = tmp_path / "state"
    err = _one_line_error(capsys, _serve(_job(tmp_path, state, missing)))
    assert f"data_dir: {missing}: no such directory" in err
    assert "train-images-idx3-ubyte" in err  # which files
    assert "dataset-fashion-mnist" in err and "$BITFLEET_DATA_DIR" in err  # how to get them
    assert not state.exists()  # found before the coordinator set anything up


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("MISSING", "Fashion-MNIST not found (data_dir: MISSING: no such directory): "),
        ("fashion-mnist:0/2", "Fashion-MNIST not found ($BITFLEET_DATA_DIR: not set; "),
        ("cifar10:0/2", "CIFAR-10 not found ($BITFLEET_DATA_DIR: not set; "),
    ],
)
def test_agent_without_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: str, expected: str
) -> None:
    missing = str(tmp_path / "srv" / "data")
    data = data.replace("MISSING", missing)
    argv = ["agent", "run", "--broker", BROKER, "--data", data, "--state-dir", str(tmp_path)]
    err = _one_line_error(capsys, argv)
    assert expected.replace("MISSING", missing) in err
    assert "$BITFLEET_DATA_DIR" in err.split("): ", 1)[1]  # how to get it


def test_export_of_a_garbage_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"this is no checkpoint at all")
    out = tmp_path / "model.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(out)]
    err = _one_line_error(capsys, argv)
    assert f"--checkpoint {checkpoint}: not a safetensors checkpoint" in err
    assert not out.exists()


def test_export_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "models"
    blocker.write_text("a file, not a folder")
    out = blocker / "x.onnx"
    argv = ["export", "--checkpoint", str(tmp_path / "absent"), "--out", str(out)]
    err = _one_line_error(capsys, argv)  # before the checkpoint is even looked at
    assert f"--out {out}: {blocker} is a file, not a directory" in err
