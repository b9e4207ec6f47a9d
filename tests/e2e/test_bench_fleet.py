"""`bitfleet bench fleet` at a small scale: its JSON contract, and nothing lost."""

from __future__ import annotations

from bitfleet.cli.main import build_parser
from fleet.bench_fleet import format_table, run_fleet_bench
from tests.conftest import require_mosquitto

KEYS = {
    "agents",
    "rounds",
    "updates_expected",
    "updates_received",
    "lost",
    "register_s",
    "round_overhead_s",
    "coordinator_peak_rss_mb",
}


def test_bench_fleet_with_20_agents() -> None:
    require_mosquitto()
    args = build_parser().parse_args(["bench", "fleet", "--agents", "20", "--rounds", "2"])
    assert (args.agents, args.rounds, args.small) == (20, 2, None)

    result = run_fleet_bench(20, 2, small=2)
    for run, agents in ((result, 20), (result["small"], 2)):
        assert set(run) >= KEYS
        assert (run["agents"], run["rounds"], run["updates_expected"]) == (agents, 2, 2 * agents)
        assert run["updates_received"] == 2 * agents and run["lost"] == 0
        assert run["register_s"] > 0 and run["round_overhead_s"] > 0
        assert run["coordinator_peak_rss_mb"] > 50
    assert result["growth"]["agents"] == 10
    assert result["machine"]["mosquitto"]
    table = format_table(result)
    assert "| 20 | 2 | 40 | 40 | 0 |" in table and "10x the agents" in table
