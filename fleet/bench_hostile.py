"""`bitfleet bench hostile`: one hostile board among three honest ones, in a real fleet.

Each job (`fleet.hostile_job.run_job`) is a provisioned fleet of four boards over TLS: the real
coordinator and three honest agents as processes, on a real Fashion-MNIST subset, and the
hostile dev3 (`fleet.hostile_board`) with its own account. The baseline is the same job with
the three honest boards alone.

What each job records, and the acceptance lines (`acceptance`):

- the coordinator's exit code; it must be 0 with every round done;
- which honest boards received a model that onnxruntime loads (and its test accuracy);
- the final float accuracy (the coordinator's store), within `ACC_TOLERANCE` of the baseline;
- for `RSS_ATTACKS`, the coordinator's VmRSS (/proc/PID/status, every 50 ms): the peak in the
  attack window (its sending, plus `SETTLE_S`) minus the last sample before it, at most
  2 x the model's tensor bytes x the 4 devices, plus one MQTT packet's receive cost (`rss_limit`);
- for `UPLOAD_ATTACKS` (those two and the flood while the honest boards upload), every honest
  board's update stored in every round (the store's `updates`), none evicted;
- the coordinator's drops by reason and evictions of partial uploads (from its log), and
  whether Mosquitto dropped messages queued for the coordinator (from the broker's log).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .broker import find_mosquitto
from .hostile_board import ATTACKS, RSS_ATTACKS, UPLOAD_ATTACKS
from .hostile_job import CHUNK_KIB, HONEST, run_job, write_fmnist_subset

ACC_TOLERANCE = 0.02


def acceptance(job: dict[str, Any], baseline: dict[str, Any], rounds: int) -> dict[str, bool]:
    """The acceptance lines of one attack against the baseline (see the module docstring)."""
    acc, base = job.get("acc_fp32"), baseline.get("acc_fp32")
    checks = {
        "coordinator": job.get("coordinator_exit") == 0 and job.get("rounds_done") == rounds,
        "models": all(v is not None for v in job.get("honest_models", {}).values()),
        "accuracy": acc is not None and base is not None and abs(acc - base) <= ACC_TOLERANCE,
    }
    if job["attack"] in RSS_ATTACKS:
        growth, limit = job.get("rss_growth_mb"), job.get("rss_limit_mb")
        checks["rss"] = growth is not None and limit is not None and growth <= limit
    if job["attack"] in UPLOAD_ATTACKS:
        evicted = set(job.get("evicted", {})) & set(HONEST)
        checks["honest_updates"] = bool(job.get("honest_updates_ok")) and not evicted
    return checks


# -- the bench ----------------------------------------------------------------------------------


def run_hostile_bench(
    attacks: list[str],
    rounds: int = 3,
    deadline_s: float = 6.0,
    work: Path | None = None,
    progress: Any = None,
    chunk_kib: int = CHUNK_KIB,
) -> dict[str, Any]:
    """The baseline, then each attack; figures and acceptance per attack."""
    from bitfleet.machine import describe_machine

    find_mosquitto()
    with contextlib.ExitStack() as stack:
        if work is None:
            tmp = tempfile.TemporaryDirectory(prefix="bitfleet-hostile-")
            work = Path(stack.enter_context(tmp))
        data_dir = write_fmnist_subset(work / "data")
        baseline = run_job(None, work / "baseline", data_dir, rounds, deadline_s, chunk_kib)
        base_checks = acceptance(baseline, baseline, rounds)
        baseline["pass"] = {k: base_checks[k] for k in ("coordinator", "models")}
        if progress is not None:
            progress.done("baseline", _summary(baseline))
        jobs = []
        for attack in attacks:
            job = run_job(attack, work / attack, data_dir, rounds, deadline_s, chunk_kib)
            acc, base = job.get("acc_fp32"), baseline.get("acc_fp32")
            job["acc_diff"] = None if acc is None or base is None else round(acc - base, 4)
            job["pass"] = acceptance(job, baseline, rounds)
            jobs.append(job)
            if progress is not None:
                progress.done(attack, _summary(job))
    for job in [baseline, *jobs]:
        job.pop("_rss", None)  # the raw samples: thousands of pairs, not for the JSON
    ok = all(all(j["pass"].values()) for j in [baseline, *jobs])
    return {"machine": describe_machine(), "rounds": rounds, "deadline_s": deadline_s,
            "chunk_kib": chunk_kib,
            "baseline": baseline, "attacks": jobs, "pass": ok}  # fmt: skip


def _summary(job: dict[str, Any]) -> str:
    failed = [k for k, v in job.get("pass", {}).items() if not v]
    return f"exit {job.get('coordinator_exit')}, acc {job.get('acc_fp32')}, {job['wall_s']} s" + (
        f", FAILED {', '.join(failed)}" if failed else ""
    )


def format_table(result: dict[str, Any]) -> str:
    rows = [("job", "coord exit", "honest models", "acc fp32", "diff", "RSS growth/limit MB",
             "honest upd", "dropped", "wall s", "result")]  # fmt: skip
    for job in [result["baseline"], *result["attacks"]]:
        models = job.get("honest_models", {})
        growth, limit = job.get("rss_growth_mb"), job.get("rss_limit_mb")
        per_round = [sum(d in u for d in HONEST) for u in job.get("updates_per_round", [])]
        failed = [k for k, v in job["pass"].items() if not v]
        rows.append((
            job["attack"],
            f"{job.get('coordinator_exit')} ({job.get('rounds_done')} rounds)",
            f"{sum(v is not None for v in models.values())}/{len(HONEST)}",
            "-" if job.get("acc_fp32") is None else f"{job['acc_fp32']:.4f}",
            "" if job.get("acc_diff") is None else f"{job['acc_diff']:+.4f}",
            "" if growth is None else f"{growth:.2f}/{limit}",
            "/".join(map(str, per_round)),
            ",".join(f"{k}:{n}" for k, n in sorted(job.get("dropped", {}).items())) or "-",
            f"{job['wall_s']:.0f}",
            "ok" if not failed else "FAIL " + ",".join(failed),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    """`bitfleet bench hostile`, registered through the `bitfleet.benches` entry point group."""
    bench = kinds.add_parser(
        "hostile",
        help="one hostile board among three honest ones: does the coordinator survive, do the "
        "honest boards get their models, does accuracy hold, does memory stay bounded",
        description="Provisions a 4-board fleet over TLS, runs the real coordinator and three "
        "honest agents on a Fashion-MNIST subset, once alone (the baseline) and once per attack "
        "with the hostile dev3, and checks each attack's outcome against the baseline.",
    )
    bench.add_argument("--attack", action="append", choices=ATTACKS, metavar="NAME",
                       help=f"one of {', '.join(ATTACKS)} (repeatable; default all)")  # fmt: skip
    bench.add_argument("--rounds", type=int, default=3, metavar="N", help="default 3")
    bench.add_argument("--deadline", type=float, default=6.0, metavar="S", help="default 6 s")
    bench.add_argument("--chunk-kib", type=int, default=CHUNK_KIB, metavar="KIB",
                       help=f"honest boards' upload chunks (default {CHUNK_KIB})")  # fmt: skip
    bench.add_argument("--work", metavar="DIR", help="keep every job's logs and state in DIR")
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json
    from bitfleet.progress import Progress

    if args.rounds < 1 or args.deadline <= 0:
        raise ValueError("--rounds must be at least 1 and --deadline positive")
    work = Path(args.work) if args.work else None
    # SIGTERM unwinds like Ctrl-C, so every job's processes and broker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run_hostile_bench(args.attack or list(ATTACKS), args.rounds, args.deadline, work,
                               Progress(), args.chunk_kib)  # fmt: skip
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0 if result["pass"] else 1
