"""The board latency model (`edge_agent.board_model`): the scaling rule, the host anchor's cache,
and one real measurement of the anchor on this host."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace

import onnxruntime as ort
import pytest

from bitfleet.cache import CACHE_ENV, cache_dir, cpu_name
from bitfleet.profiles import load_profile
from edge_agent import board_model
from edge_agent.board_model import (
    CACHE_FILE,
    HostAnchor,
    board_latency_ms,
    host_anchor,
    measure_host_anchor,
)

ANCHOR = HostAnchor(
    resnet18_ms=8.0, resnet18_int8_ms=2.0, threads=2, cpu="Test CPU", onnxruntime="1.0"
)


def test_board_latency_scales_float_files_by_the_fp32_ratio():
    pi4 = load_profile("rpi4")
    assert board_latency_ms(4.0, False, pi4, ANCHOR) == pytest.approx(4.0 * 123.12 / 8.0)
    pi5 = load_profile("rpi5")
    assert board_latency_ms(4.0, False, pi5, ANCHOR) == pytest.approx(4.0 * 19.96 / 8.0)
    # A Pi 4 takes ~6.2x a Pi 5's time for the same host measurement.
    ratio = board_latency_ms(1.0, False, pi4, ANCHOR) / board_latency_ms(1.0, False, pi5, ANCHOR)
    assert ratio == pytest.approx(123.12 / 19.96)
    assert board_latency_ms(0.0, False, pi4, ANCHOR) == 0.0


def test_board_latency_scales_integer_files_by_the_int8_ratio():
    pi4 = load_profile("rpi4")
    assert board_latency_ms(4.0, True, pi4, ANCHOR) == pytest.approx(4.0 * 83.92 / 2.0)
    x86 = load_profile("x86-server")
    assert board_latency_ms(3.0, True, x86, ANCHOR) == pytest.approx(3.0 * 6.75 / 2.0)


def test_board_latency_without_an_int8_figure_falls_back_to_fp32():
    board = replace(load_profile("jetson-nano"), resnet18_int8_ms=None)
    assert board_latency_ms(4.0, True, board, ANCHOR) == pytest.approx(4.0 * 83.44 / 8.0)
    assert board_latency_ms(4.0, True, board, ANCHOR) == board_latency_ms(4.0, False, board, ANCHOR)


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_board_latency_rejects_a_bad_host_time(bad):
    with pytest.raises(ValueError, match="host_ms"):
        board_latency_ms(bad, False, load_profile("rpi4"), ANCHOR)


def test_host_anchor_round_trips_and_rejects_bad_tables():
    assert HostAnchor.from_dict(json.loads(json.dumps(ANCHOR.to_dict()))) == ANCHOR
    good = ANCHOR.to_dict()
    for bad in [
        {**good, "resnet18_ms": 0},
        {**good, "resnet18_int8_ms": float("inf")},
        {**good, "resnet18_ms": True},
        {**good, "threads": 0},
        {**good, "cpu": 3},
        {k: v for k, v in good.items() if k != "onnxruntime"},
        {**good, "extra": 1},
        [1, 2],
    ]:
        with pytest.raises(ValueError):
            HostAnchor.from_dict(bad)  # type: ignore[arg-type]


def test_cache_dir_follows_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "bitfleet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bitfleet"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"


@pytest.fixture
def counted(monkeypatch):
    """`measure_host_anchor` replaced by a fake that counts its calls and measures nothing."""
    calls: list[int] = []

    def fake(threads: int = 4) -> HostAnchor:
        calls.append(threads)
        return HostAnchor(
            resnet18_ms=10.0 + len(calls),
            resnet18_int8_ms=3.0,
            threads=threads,
            cpu=cpu_name(),
            onnxruntime=ort.__version__,
        )

    monkeypatch.setattr(board_model, "measure_host_anchor", fake)
    return calls


def test_host_anchor_is_measured_once_then_read_from_the_cache(tmp_path, counted):
    first = host_anchor(tmp_path)
    assert counted == [min(4, os.cpu_count() or 1)]
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert HostAnchor.from_dict(cached) == first
    assert host_anchor(tmp_path) == first
    assert len(counted) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [CACHE_FILE]


def test_host_anchor_reads_the_cache_dir_from_the_environment(tmp_path, counted, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    first = host_anchor()
    assert (tmp_path / "env" / CACHE_FILE).is_file()
    assert host_anchor() == first and len(counted) == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"resnet18_ms": -1}', ""])
def test_a_corrupt_cache_is_measured_anew_and_replaced(tmp_path, counted, content):
    path = tmp_path / CACHE_FILE
    path.write_text(content)
    anchor = host_anchor(tmp_path)
    assert len(counted) == 1
    assert HostAnchor.from_dict(json.loads(path.read_text())) == anchor
    assert host_anchor(tmp_path) == anchor and len(counted) == 1


@pytest.mark.parametrize(
    "change", [{"cpu": "Another CPU"}, {"onnxruntime": "0.0.1"}, {"threads": 999}]
)
def test_a_cache_from_another_host_runtime_or_thread_count_is_replaced(tmp_path, counted, change):
    first = host_anchor(tmp_path)
    path = tmp_path / CACHE_FILE
    path.write_text(json.dumps({**first.to_dict(), **change}))
    second = host_anchor(tmp_path)
    assert len(counted) == 2 and second != first
    assert HostAnchor.from_dict(json.loads(path.read_text())) == second


def test_a_cache_for_other_threads_is_kept_apart_by_the_key(tmp_path, counted):
    host_anchor(tmp_path, threads=1)
    assert counted == [1]
    host_anchor(tmp_path, threads=1)
    assert counted == [1]
    with pytest.raises(ValueError, match="threads"):
        host_anchor(tmp_path, threads=0)


def test_measure_host_anchor_really_measures():
    """The real thing: export, quantize and time ResNet-18 on 2 threads (~5 s on 2 cores)."""
    t0 = time.perf_counter()
    anchor = measure_host_anchor(threads=2)
    seconds = time.perf_counter() - t0
    assert anchor.threads == min(2, os.cpu_count() or 1)
    for ms in (anchor.resnet18_ms, anchor.resnet18_int8_ms):
        assert math.isfinite(ms) and 0 < ms < 60_000
    assert anchor.onnxruntime == ort.__version__ and anchor.cpu
    assert HostAnchor.from_dict(json.loads(json.dumps(anchor.to_dict()))) == anchor
    assert seconds < 120, f"measuring the anchor took {seconds:.0f} s"
