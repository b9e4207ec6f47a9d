"""FedHQ at runtime: a board that slows 4x from round 3 is moved to PTQ by round 5, and the
rounds then take as long as with the board slow from the start (docs/allocation.md#runtime).

`bitfleet bench reallocation` on `experiments/reallocation_fmnist.toml` (a quarter of
Fashion-MNIST, six virtual boards, 8 rounds), both runs on the simulator's board clock."""

from __future__ import annotations

from pathlib import Path

from fleet.bench_reallocation import run_reallocation_bench
from tests.conftest import missing_part


def test_a_board_that_slows_down_is_reallocated_in_time(tmp_path: Path) -> None:
    from bitfleet.data.availability import check_available

    try:
        check_available("fashion-mnist")
    except FileNotFoundError as exc:
        missing_part(str(exc))
    r = run_reallocation_bench(
        Path(__file__).resolve().parents[2] / "experiments" / "reallocation_fmnist.toml",
        None,
        factor=4.0,
        from_round=3,
        out=tmp_path,
    )
    assert r["move"] is not None, r["runs"]
    assert r["move"]["old"] == "qat" and r["move"]["new"] == "ptq"
    assert 3 < r["moved_at_round"] <= 5, r
    assert r["max_gap_after_move"] <= 0.10, r
    # Before the slowdown the board's QAT round fit: the slowed run was faster then.
    slowed = r["runs"]["slowed"]["sim_seconds"]
    start = r["runs"]["slow_from_start"]["sim_seconds"]
    assert slowed[0] < start[0]
    assert r["runs"]["slow_from_start"]["moves"] == []  # slow and registered so: PTQ throughout
    assert r["runs"]["slowed"]["final_strategy"] == "ptq"
