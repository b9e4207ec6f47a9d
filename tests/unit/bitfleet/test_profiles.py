"""Device profiles: the shipped files, their validation, board detection, self-measurement."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitfleet.cli import profile as profile_cli
from bitfleet.profiles import (
    PROFILES_ENV,
    DeviceProfile,
    ProfileError,
    detect_board,
    load_profile,
    load_profiles,
    match_board,
    measure_machine,
    measure_step_times,
    profile_summary,
    profiles_dir,
)

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-server"}


@pytest.fixture
def one_thread():
    """Timing on one thread: quick and steady on a shared CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def profiles() -> dict[str, DeviceProfile]:
    return load_profiles(ROOT / "profiles")


@pytest.fixture
def profile_copy(tmp_path: Path) -> Path:
    """A scratch profiles folder holding a copy of rpi4.toml, to be broken by a test."""
    shutil.copy(ROOT / "profiles" / "rpi4.toml", tmp_path / "rpi4.toml")
    return tmp_path


def test_every_shipped_profile_loads_and_validates(profiles):
    assert set(profiles) >= SHIPPED
    for name, p in profiles.items():
        assert p.name == name
        assert p.cores > 0 and p.clock_ghz > 0 and p.memory_gib > 0 and p.gflops_fp32 > 0
        assert p.qat_overhead >= 1.0 and 0 < p.relative_speed <= 1.0 and p.link_mbps > 0
        assert p.deploy_bits and set(p.storage_bits) <= set(range(2, 9))
        assert "CPUExecutionProvider" in p.onnxruntime_providers
        assert p.preferred_storage in ("int8", "packed")
        json.dumps(p.to_dict())
    dot = {n: profiles[n].int_dot_product for n in SHIPPED}
    assert dot == {
        "rpi4": False,
        "rpi5": True,
        "jetson-nano": False,
        "jetson-orin-nano": True,
        "x86-server": True,
    }
    assert profiles["rpi4"].preferred_storage == "packed"
    assert profiles["jetson-nano"].preferred_storage == "packed"
    assert profiles["rpi5"].preferred_storage == "int8"
    assert profiles["x86-server"].relative_speed == 1.0


def test_load_profile_by_name_path_and_env(profiles, monkeypatch, profile_copy):
    assert load_profile("rpi5") == profiles["rpi5"]
    assert load_profile(ROOT / "profiles" / "jetson-nano.toml") == profiles["jetson-nano"]
    monkeypatch.setenv(PROFILES_ENV, str(profile_copy))
    assert profiles_dir() == profile_copy
    assert set(load_profiles()) == {"rpi4"}
    with pytest.raises(ProfileError, match=r"unknown device profile 'rpi9'; known: rpi4"):
        load_profile("rpi9")
    monkeypatch.setenv(PROFILES_ENV, str(profile_copy / "nowhere"))
    with pytest.raises(FileNotFoundError, match=PROFILES_ENV):
        profiles_dir()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("cores = 4\n", "", r"missing key 'cores'"),
        ("cores = 4\n", 'cores = "four"\n', r"key 'cores': expected an integer in 1..1024"),
        ("link_mbps = 40.0", "link_mbps = 1e300", r"key 'link_mbps': expected a number in"),
        ("deploy_bits = [8]", "deploy_bits = [16]", r"key 'deploy_bits'"),
        ('preferred_storage = "packed"', 'preferred_storage = "zip"', r"'preferred_storage'"),
        ("qat_overhead = 1.4", "qat_overhead = 0.9", r"key 'qat_overhead'"),
        ("int_dot_product = false", "int_dot_product = 0", r"key 'int_dot_product'"),
        ("nv_tegra_release = false", "nv_tegra_release = 1", r"key 'detect.nv_tegra_release'"),
        ('arch = "aarch64"', "arch = 64", r"key 'detect.arch'"),
        ("cores = 4\n", "cores = 4\ncorse = 4\n", r"unknown key 'corse'"),
        ("cpu_flags = []\n", "", r"missing key 'detect.cpu_flags'"),
        ('name = "rpi4"', 'name = "rpi-4"', r"key 'name'.*file name 'rpi4'"),
        ("link_mbps = 40.0", "link_mbps = [", r"not valid TOML"),
        ("resnet18_ms = 123.12", "", r"missing key 'resnet18_ms'"),
        ("resnet18_ms = 123.12", "resnet18_ms = 0", r"key 'resnet18_ms': expected a number in"),
        ("resnet18_ms = 123.12", "resnet18_ms = -5.0", r"key 'resnet18_ms': expected a number"),
        ("resnet18_ms = 123.12", 'resnet18_ms = "fast"', r"key 'resnet18_ms'"),
        ("resnet18_int8_ms = 83.92", "resnet18_int8_ms = 2e6", r"key 'resnet18_int8_ms'"),
        ("resnet18_int8_ms = 83.92", "resnet18_int8_ms = true", r"key 'resnet18_int8_ms'"),
    ],
)
def test_bad_profile_names_file_and_key(profile_copy, old, new, message):
    path = profile_copy / "rpi4.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ProfileError, match=message) as info:
        load_profiles(profile_copy)
    assert str(path) in str(info.value)


def test_resnet18_int8_ms_is_optional(profile_copy):
    path = profile_copy / "rpi4.toml"
    text = path.read_text()
    assert "resnet18_int8_ms = 83.92" in text
    path.write_text(text.replace("resnet18_int8_ms = 83.92", "", 1))
    board = load_profiles(profile_copy)["rpi4"]
    assert board.resnet18_int8_ms is None and board.resnet18_ms == 123.12
    data = board.to_dict()
    assert "resnet18_int8_ms" not in data and data["resnet18_ms"] == 123.12
    assert DeviceProfile.from_dict(data) == board
    assert DeviceProfile.from_dict({**data, "resnet18_int8_ms": None}) == board


def test_to_dict_from_dict_round_trip(profiles):
    for board in profiles.values():
        data = json.loads(json.dumps(board.to_dict()))
        assert data["resnet18_ms"] == board.resnet18_ms
        assert data["resnet18_int8_ms"] == board.resnet18_int8_ms
        assert "budget_bits" not in data
        back = DeviceProfile.from_dict(data)
        assert back == board and back.path is None
    for budget in (4, 2.5):
        budgeted = replace(profiles["rpi5"], budget_bits=budget)
        assert DeviceProfile.from_dict(budgeted.to_dict()) == budgeted
    for bad in (1.5, 9, "4", True, float("nan")):
        with pytest.raises(ProfileError, match="budget_bits': expected bits per weight in 2..8"):
            DeviceProfile.from_dict({**profiles["rpi5"].to_dict(), "budget_bits": bad})


def test_from_dict_checks_the_speed_keys(profiles):
    data = profiles["rpi5"].to_dict()
    del data["resnet18_ms"]
    with pytest.raises(ProfileError, match=r"registration: missing key 'resnet18_ms'"):
        DeviceProfile.from_dict(data)
    for key, bad in [("resnet18_ms", 0), ("resnet18_ms", 1e7), ("resnet18_int8_ms", -1.0)]:
        with pytest.raises(ProfileError, match=rf"registration: key '{key}'"):
            DeviceProfile.from_dict({**profiles["rpi5"].to_dict(), key: bad})


def test_shipped_speeds_follow_ncnn_resnet18(profiles):
    """relative_speed is x86-server's ncnn ResNet-18 latency over the board's (profiles/README.md);
    the figures are ncnn's published ones, so a Pi 5 is ~6x a Pi 4 and a Nano beats a Pi 4."""
    server = profiles["x86-server"].resnet18_ms
    for name in SHIPPED:
        board = profiles[name]
        assert board.relative_speed == pytest.approx(server / board.resnet18_ms, rel=1e-3)
        assert board.resnet18_int8_ms is not None  # every shipped board's table has one
    pi4, pi5, nano = profiles["rpi4"], profiles["rpi5"], profiles["jetson-nano"]
    assert pi4.resnet18_ms / pi5.resnet18_ms == pytest.approx(6.15, rel=0.01)
    assert pi5.relative_speed / pi4.relative_speed == pytest.approx(6.15, rel=0.01)
    assert nano.resnet18_ms < pi4.resnet18_ms and nano.relative_speed > pi4.relative_speed
    assert (pi4.resnet18_ms, pi5.resnet18_ms, nano.resnet18_ms) == (123.12, 19.96, 83.44)
    assert profiles["jetson-orin-nano"].resnet18_ms == 15.13


def test_missing_detect_table_is_named(profile_copy):
    path = profile_copy / "rpi4.toml"
    path.write_text(path.read_text().split("[detect]")[0])
    with pytest.raises(ProfileError, match=r"rpi4\.toml: missing table 'detect'"):
        load_profiles(profile_copy)


@pytest.mark.parametrize(
    ("model", "tegra", "flags", "arch", "expected", "exact"),
    [
        ("Raspberry Pi 4 Model B Rev 1.4", False, {"fp", "asimd"}, "aarch64", "rpi4", True),
        ("Raspberry Pi 400 Rev 1.0", False, {"fp", "asimd"}, "aarch64", "rpi4", True),
        ("Raspberry Pi 5 Model B Rev 1.0", False, {"asimd", "asimddp"}, "aarch64", "rpi5", True),
        ("NVIDIA Jetson Nano Developer Kit", True, {"asimd"}, "aarch64", "jetson-nano", True),
        # In a container /etc/nv_tegra_release is absent: the board's own name still decides.
        ("NVIDIA Jetson Nano Developer Kit", False, {"asimd"}, "aarch64", "jetson-nano", True),
        (
            "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
            True,
            {"asimd", "asimddp"},
            "aarch64",
            "jetson-orin-nano",
            True,
        ),
        ("", False, {"avx2", "avx512_vnni"}, "x86_64", "x86-server", False),
        ("", False, set(), "AMD64", "x86-server", False),
        # Unknown boards: the closest kind of the same architecture.
        (
            "NVIDIA Jetson AGX Orin Developer Kit",
            True,
            {"asimddp"},
            "aarch64",
            "jetson-orin-nano",
            False,
        ),
        ("Raspberry Pi 3 Model B Rev 1.2", False, {"asimd"}, "aarch64", "rpi4", False),
        ("", False, {"asimd", "asimddp"}, "arm64", "rpi5", False),
        ("", True, {"asimd"}, "aarch64", "jetson-nano", False),
    ],
)
def test_detect_board_from_injected_facts(profiles, model, tegra, flags, arch, expected, exact):
    facts = dict(device_tree_model=model, tegra=tegra, cpu_flags=flags, arch=arch)
    assert detect_board(profiles, **facts).name == expected
    match = match_board(profiles, **facts)
    assert match.exact is exact and match.reason


def test_detect_board_unknown_arch_is_a_clear_error(profiles):
    with pytest.raises(ProfileError, match=r"no known board kind for architecture 'riscv64'"):
        detect_board(profiles, device_tree_model="", tegra=False, cpu_flags=[], arch="riscv64")


def test_detect_board_reads_this_machine(profiles):
    board = detect_board(profiles)
    assert board.name in profiles


def test_measure_machine_is_sane_and_json_ready():
    m = measure_machine()
    json.dumps(m)
    assert m["logical_cores"] >= 1 and 1 <= m["usable_cores"] <= m["logical_cores"]
    assert 0 < m["memory_available_gib"] <= m["memory_gib"]
    assert m["arch"] and isinstance(m["int_dot_product"], list)
    assert set(m["int_dot_product"]) <= {"avx512_vnni", "avx_vnni", "asimddp"}
    assert m["max_clock_ghz"] is None or 0.1 < m["max_clock_ghz"] < 10
    assert isinstance(m["nv_tegra_release"], bool)


def test_measure_step_times_and_summary(one_thread, profiles):
    steps = measure_step_times("lenet5", batch_size=16, steps=3, qat_bits=4)
    assert steps["t_fp"] > 0 and steps["t_qat"] > 0
    assert steps["batch_size"] == 16 and steps["model"] == "lenet5"
    assert steps["torch_threads"] == 1
    summary = profile_summary(profiles["rpi5"], measure_machine(), steps)
    assert summary["board"]["name"] == "rpi5" and summary["qat_overhead_source"] == "measured"
    assert summary["qat_overhead"] == pytest.approx(steps["t_qat"] / steps["t_fp"], rel=1e-3)
    assert json.loads(json.dumps(summary)) == summary
    without = profile_summary(profiles["rpi4"], {}, None)
    assert without["qat_overhead"] == 1.4 and without["step_times"] is None


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bitfleet")
    profile_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_profile_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert run_cli(["profile", "--no-steps", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "closest known kind:" in printed and "machine:" in printed
    summary = json.loads(out.read_text())
    assert summary["board"]["name"] in SHIPPED and summary["step_times"] is None
    assert summary["measured"]["logical_cores"] >= 1
    assert summary["board"]["deploy_bits"] and summary["board"]["relative_speed"] > 0


def test_profile_cli_times_steps(tmp_path, capsys, one_thread):
    out = tmp_path / "profile.json"
    argv = ["profile", "--batch-size", "8", "--steps", "2", "--json", str(out)]
    assert run_cli(argv) == 0
    assert "step time (lenet5, batch 8" in capsys.readouterr().out
    steps = json.loads(out.read_text())["step_times"]
    assert steps["t_fp"] > 0 and steps["t_qat"] > 0


def test_profile_cli_rejects_a_bad_model_before_measuring(capsys):
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known models: lenet5"):
        run_cli(["profile", "--model", "nope"])
    assert capsys.readouterr().out == ""
