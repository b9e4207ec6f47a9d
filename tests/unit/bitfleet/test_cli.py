"""The `bitfleet` command line: help, errors a user can act on, and the bench's JSON contract."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bitfleet.bench.quant import QUICK, format_table, run_quant_bench
from bitfleet.cli.main import main
from bitfleet.data import fashion_mnist
from tests.tiny_fmnist import make_tiny_fmnist

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def tiny_fmnist(tmp_path: Path) -> Path:
    return make_tiny_fmnist(tmp_path)


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "quant", "--help"])
    out = capsys.readouterr().out
    for option in ("--quick", "--json", "--data-dir", "--seed"):
        assert option in out


def test_missing_data_is_a_clear_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BITFLEET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    code = main(["bench", "quant", "--quick", "--data-dir", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "--data-dir" in err and "dataset-fashion-mnist" in err and "--download" in err


def test_bench_quant_writes_every_contract_key(tiny_fmnist: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, fp_epochs=1, qat_epochs=0.2, mqat_epochs=0.2, timing_steps=3)
    result = run_quant_bench(cfg, data_dir=tiny_fmnist)
    bits = ["8", "6", "4", "3", "2"]
    assert set(result["ptq"]) == {"max", "mse"}
    assert all(list(result["ptq"][s]) == bits for s in ("max", "mse"))
    assert list(result["qat"]) == ["4", "2"]
    assert list(result["mqat"]) == ["32", *bits]
    accs = [result["fp32_acc"], *result["qat"].values(), *result["mqat"].values()]
    accs += [a for s in result["ptq"].values() for a in s.values()]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert result["fp32_acc"] > 0.5  # the toy task is easy; a broken loop would be at 0.1
    assert result["qat_step_ratio"] > 0 and result["seconds"] > 0
    json.dumps(result)
    assert "QAT 2-bit" in format_table(result)


def test_cli_writes_json_atomically(tiny_fmnist: Path, tmp_path: Path) -> None:
    """End to end through the console script's entry point, as a user runs it."""
    out = tmp_path / "res" / "bench.json"
    code = main(["bench", "quant", "--quick", "--data-dir", str(tiny_fmnist), "--json", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["fp32_acc"] > 0.5
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    install = shlex.split(test_cmd)[0]
    assert (ROOT / install).exists()


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "bitfleet"
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("bitfleet ")
