"""One hostile board among three honest ones in a real provisioned fleet (`bench hostile`).

Every attack of `fleet.hostile_board` runs as its own job beside a baseline of the three honest
boards alone: the coordinator (a process) must finish the job with exit code 0, every honest
board must receive a model onnxruntime loads, and the final float accuracy must stay within
0.02 of the baseline's; under the chunk flood and the huge declared uploads the coordinator's
memory grows by at most 2 x the model's update size per device (plus one packet's receive cost,
`rss_limit`) and no honest upload is lost.
The figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.bench_hostile import ACC_TOLERANCE, acceptance
from fleet.hostile_board import ATTACKS, RSS_ATTACKS, UPLOAD_ATTACKS
from fleet.hostile_job import HONEST, run_job, write_fmnist_subset
from tests.conftest import require_mosquitto
from tests.proc_cmdline import CmdlineSampler, fleet_passwords

ROUNDS = 3
DEADLINE_S = 6.0


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_mosquitto()
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def data_dir(work: Path) -> Path:
    return write_fmnist_subset(work / "data")


def run_watched(attack: str | None, work: Path, data_dir: Path) -> dict[str, Any]:
    """`run_job`, scanning every process's command line for the fleet's passwords meanwhile:
    the coordinator and the three agents are seen, and none shows one."""
    folder = work / (attack or "baseline")

    def ours(line: str) -> bool:
        return str(folder) in line and (" agent run " in line or " coordinator serve " in line)

    with CmdlineSampler(lambda: fleet_passwords(folder / "fleet"), ours) as sampler:
        job = run_job(attack, folder, data_dir, ROUNDS, DEADLINE_S)
    assert not sampler.leaks, sampler.leaks
    # By role, not by pid: a process between fork and exec shows its parent's command line.
    roles = {_role(line) for line in sampler.watched.values()}
    assert roles == {"coordinator", *HONEST}, sampler.watched
    return job


def _role(line: str) -> str:
    return (
        "coordinator" if " coordinator serve " in line else line.split("--device-id ")[1].split()[0]
    )


@pytest.fixture(scope="module")
def baseline(work: Path, data_dir: Path) -> dict[str, Any]:
    job = run_watched(None, work, data_dir)
    print(f"\nbaseline: {_figures(job)}")
    assert job["coordinator_exit"] == 0 and job["rounds_done"] == ROUNDS, _logs(work / "baseline")
    assert all(v is not None for v in job["honest_models"].values()), job["honest_models"]
    assert job["honest_updates_ok"], job["updates_per_round"]
    return job


def _figures(job: dict[str, Any]) -> str:
    keys = ("coordinator_exit", "rounds_done", "acc_fp32", "acc_diff", "honest_models",
            "rss_before_mb", "rss_window_peak_mb", "rss_growth_mb", "rss_limit_mb",
            "updates_per_round", "dropped", "evicted", "wall_s")  # fmt: skip
    return json.dumps({k: job[k] for k in keys if k in job})


def _logs(folder: Path) -> str:
    tail = []
    for name in ("coordinator.log", "dev0.log"):
        path = folder / name
        if path.exists():
            tail.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
    return "\n".join(tail)


@pytest.mark.parametrize("attack", ATTACKS)
def test_one_hostile_board_among_three_honest_ones(
    attack: str, work: Path, data_dir: Path, baseline: dict[str, Any]
) -> None:
    job = run_watched(attack, work, data_dir)
    acc, base = job.get("acc_fp32"), baseline["acc_fp32"]
    job["acc_diff"] = None if acc is None else round(acc - base, 4)
    print(f"\n{attack}: {_figures(job)}")
    checks = acceptance(job, baseline, ROUNDS)
    logs = _logs(work / attack)
    assert job.get("hostile_joined") is True, "the hostile board never reached the coordinator"
    assert checks["coordinator"], (
        f"coordinator exit {job['coordinator_exit']}, {job['rounds_done']} rounds\n{logs}"
    )
    assert checks["models"], f"honest models: {job['honest_models']}\n{logs}"
    assert checks["accuracy"], (
        f"accuracy {acc} vs baseline {base}: more than {ACC_TOLERANCE} apart\n{logs}"
    )
    if attack in RSS_ATTACKS:
        assert checks["rss"], (
            f"coordinator RSS grew {job.get('rss_growth_mb')} MB in the attack, "
            f"limit {job.get('rss_limit_mb')} MB\n{logs}"
        )
    if attack in UPLOAD_ATTACKS:
        assert checks["honest_updates"], (
            f"honest updates per round {job['updates_per_round']}, evicted {job['evicted']}"
        )
