"""FedHQ's fine stage: short trial rounds, a fitted cost model, a chosen assignment.

The coarse stage leaves some devices ambiguous. Each candidate QAT set among them (prefixes of
the devices ordered by how strongly they lean to QAT) trains `fine_rounds` short rounds from
the current global model through the round runner, without committing them; the accuracy gained
at the lowest deploy width and the simulated round time feed `CostModel`, and
`choose_assignment` picks the set that maximises accuracy at the job's time weight
(docs/allocation.md#fine-stage).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .allocation import (
    Allocation,
    AllocationInput,
    CostModel,
    choose_assignment,
    plan_fine_candidates,
    qat_share,
)
from .assigner import Assigner
from .config import JobConfig
from .evaluation import Evaluator
from .global_model import StateDict
from .rounds import RoundRunner

log = logging.getLogger(__name__)


def run_fine_stage(
    cfg: JobConfig,
    fleet: AllocationInput,
    allocation: Allocation,
    *,
    state: StateDict,
    selected: list[str],
    assigner: Assigner,
    runner: RoundRunner,
    evaluator: Evaluator,
) -> dict[str, Any] | None:
    """Revisit `allocation`'s ambiguous devices with trial rounds on `selected`; assign the
    chosen set and return the stage's report (None when stopped before it finished)."""
    t0 = time.perf_counter()
    a = cfg.allocation
    points, ambiguous = allocation.significance, allocation.ambiguous
    costs = {c.device: c for c in fleet.costs(a.calib_batches)}
    fixed = {d: s for d, s in allocation.strategies.items() if d not in ambiguous}

    def strategies(qat: frozenset[str]) -> dict[str, str]:
        hybrid = {d: a.qat_strategy if d in qat else a.ptq_strategy for d in ambiguous}
        return {**fixed, **hybrid}

    def predicted(qat: frozenset[str]) -> float:
        return max(costs[d].round_seconds(s) for d, s in strategies(qat).items())

    bits = min(cfg.deploy.bits)
    base_acc = evaluator.accuracy(state, bits)
    candidates = plan_fine_candidates(ambiguous, points, a.fine_candidates)
    shares, gains, preds, measured = [], [], [], []
    trial = 0
    for qat in candidates:
        for dev, strategy in strategies(qat).items():
            assigner.assign(dev, strategy)
        trial_state = {k: v.clone() for k, v in state.items()}
        seconds = 0.0
        for _ in range(a.fine_rounds):
            result = runner.run(0, selected, trial_state, a.fine_epochs, trial=trial)
            trial += 1
            if not result.received:
                return None  # stopped
            trial_state = {**trial_state, **result.aggregate.mean()}  # keeps integer buffers
            seconds += result.sim_seconds
        shares.append(qat_share(qat, ambiguous, points))
        gains.append(evaluator.accuracy(trial_state, bits) - base_acc)
        preds.append(predicted(qat) * a.fine_epochs / cfg.training.local_epochs)
        measured.append(seconds / a.fine_rounds)
    model = CostModel.fit(shares, gains, preds, measured)
    r_ptq = max(c.ptq_round for c in costs.values())
    r_qat = max(c.qat_round for c in costs.values())
    chosen = choose_assignment(model, ambiguous, points, predicted, r_ptq, r_qat, a.time_weight)
    for dev, strategy in strategies(chosen).items():
        allocation.strategies[dev] = strategy
        if dev in ambiguous:
            allocation.rules[dev] = "fine_qat" if dev in chosen else "fine_ptq"
        assigner.assign(dev, strategy)
    assigner.seconds["fine"] = time.perf_counter() - t0
    log.info("fine stage: QAT for %s among ambiguous %s", sorted(chosen), ambiguous)
    return {
        "trial_sim_seconds_total": sum(measured) * a.fine_rounds,
        "candidates": [sorted(q) for q in candidates],
        "qat_share": shares,
        "acc_gain": gains,
        "trial_sim_seconds": measured,
        "acc_coef": list(model.acc_coef),
        "time_scale": model.time_scale,
        "chosen_qat": sorted(chosen),
    }
