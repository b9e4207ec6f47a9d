"""The simulator's two compute runners train the same model (docs/simulation.md#compute): worker
processes and the sequential main thread, one round of the same job, differ only by float
summation order."""

from __future__ import annotations

import os
from pathlib import Path

from bitfleet.data import load_dataset
from coordinator.config import job_config_from_dict
from fleet.bench_simulator import ONE_ROUND_TOLERANCE, model_difference
from fleet.simulate.compute import ProcessCompute
from fleet.simulate.experiment import load_experiment
from fleet.simulate.run import _job_dict, run_method
from fleet.simulate.virtual_fleet import build_fleet
from tests.tiny_experiment import tiny_experiment
from tests.tiny_fmnist import make_tiny_fmnist


def test_worker_processes_and_the_main_thread_train_the_same_model(tmp_path: Path) -> None:
    path = tmp_path / "compute.toml"
    data_dir = make_tiny_fmnist(tmp_path / "d", n_train=800)
    text = tiny_experiment(
        data_dir, per_board=2, rounds=1, local_epochs=1.0, methods={"mqat": "mqat"}
    )
    path.write_text(text)
    exp = load_experiment(path)
    overlay = exp.methods["mqat"]
    cfg = job_config_from_dict(_job_dict(exp, overlay, "mqat", tmp_path, False), source="t")
    data = load_dataset(cfg.data.dataset, data_dir=cfg.data.data_dir)
    fleet = build_fleet(exp, data, cfg, False)
    runs = {}
    for runner in ("sequential", "processes"):
        compute = ProcessCompute(workers=2) if runner == "processes" else None
        try:
            entry, coordinator = run_method(
                exp, "mqat", overlay, fleet, data, tmp_path / runner, quick=False, broker=None,
                compute=compute,
            )  # fmt: skip
        finally:
            if compute is not None:
                compute.close()
        runs[runner] = (entry, coordinator.result())
        if compute is not None:  # the rounds ran in the workers, not in this process
            assert compute.workers_seen and os.getpid() not in compute.workers_seen
    (seq, seq_job), (par, par_job) = runs["sequential"], runs["processes"]
    assert sorted(seq_job.reports[0].received) == sorted(par_job.reports[0].received)
    assert len(seq_job.reports[0].received) == 4
    assert model_difference(seq_job.global_state, par_job.global_state) <= ONE_ROUND_TOLERANCE
    assert seq["sim_seconds"] == par["sim_seconds"]  # the board clock is the same
