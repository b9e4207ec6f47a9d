"""`bitfleet bench fleet`: the real coordinator against N lightweight agents over Mosquitto.

What grows with a fleet is the coordinator's work per device (one registration; per round one
task out and one update in) and whatever it keeps per device. This bench drives the real
`Coordinator` class, in a process of its own so that its peak memory is its own, against N
synthetic agents spread over a few processes: each agent is one MQTT connection (the real
`MqttTransport`) that registers and answers every task at once with an update of the model's
real size (the task's LeNet-5 plus noise; no training), so the figures are the coordinator's
and the broker's, not the boards'. The same run measures N/10 agents first, so that growth
ratios hold on a noisy machine.

Per fleet size:

- `register_s`: from the moment the agents start connecting until the coordinator has
  recorded the last registration (both clocks are this machine's wall clock);
- `round_overhead_s`: the coordinator's own time in a round (sending tasks, folding updates,
  aggregating, checkpointing), without the wait for updates: `RoundReport.overhead_seconds`,
  averaged over the rounds;
- `updates_expected`, `updates_received`, `lost`: N x R, the updates the coordinator
  aggregated, and the difference;
- `coordinator_peak_rss_mb`: the kernel's high-water mark of the coordinator process's
  resident memory (getrusage), which a sampling monitor could miss.

Each role runs as `python -m fleet.bench_roles ROLE SPEC` (fleet/bench_roles.py), and talks
to the bench over its standard streams: one line `ready` once it is set up, `result JSON` at the
end; agents start connecting on a `go` line and disconnect on `stop`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .bench_roles import DEADLINE_S
from .broker import MosquittoProcess, find_mosquitto, free_port

AGENTS_PER_PROCESS = 250
"""Agents one process serves: one paho thread each, and mostly idle between tasks."""


# -- the command line -----------------------------------------------------------------------


def add_bench_parser(kinds: argparse._SubParsersAction) -> None:
    """`bitfleet bench fleet`, registered through the `bitfleet.benches` entry point group."""
    bench = kinds.add_parser(
        "fleet",
        help="coordinator registration time, per-round overhead, lost updates and peak memory "
        "with N agents over Mosquitto",
        description="Starts Mosquitto on a free port, the real coordinator in its own process "
        "and N lightweight agents (threads in a few processes, synthetic LeNet-5-sized updates, "
        "no training), runs R rounds, and measures registration time, the coordinator's own "
        "time per round, updates received and lost, and the coordinator's peak RSS; first for "
        "N/10 agents, then for N, in the same run.",
    )
    bench.add_argument("--agents", type=int, default=100, metavar="N", help="default 100")
    bench.add_argument("--rounds", type=int, default=3, metavar="R", help="default 3")
    bench.add_argument(
        "--small",
        type=int,
        metavar="K",
        help="agents of the comparison run measured first (default N/10; 0: none)",
    )
    bench.add_argument(
        "--processes",
        type=int,
        metavar="P",
        help=f"agent processes (default: one per {AGENTS_PER_PROCESS} agents)",
    )
    bench.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from bitfleet.cli.output import write_json
    from bitfleet.progress import Progress

    small = args.agents // 10 if args.small is None else args.small
    result = run_fleet_bench(args.agents, args.rounds, small, args.processes, Progress())
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0 if result["lost"] == 0 and result.get("small", {}).get("lost", 0) == 0 else 1


# -- the bench --------------------------------------------------------------------------------


def run_fleet_bench(
    agents: int, rounds: int, small: int = 0, processes: int | None = None, progress: Any = None
) -> dict[str, Any]:
    """Measure `small` agents (if > 0), then `agents`; the figures of the latter at the top
    level, the former's under `small`, their ratios under `growth`."""
    if agents < 1 or rounds < 1:
        raise ValueError("--agents and --rounds must be at least 1")
    if not 0 <= small < agents:
        raise ValueError(f"--small must be in 0..{agents - 1}, got {small}")
    if processes is not None and processes < 1:
        raise ValueError("--processes must be at least 1")
    find_mosquitto()  # fail before any set-up when it is missing
    _raise_fd_limit(agents)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitfleet-bench-fleet-") as tmp:
        runs = {}
        for n in (small, agents) if small else (agents,):
            procs = processes or math.ceil(n / AGENTS_PER_PROCESS)
            runs[n] = _measure(n, rounds, min(procs, n), Path(tmp) / f"n{n}")
            if progress is not None:
                progress.done(f"{n} agents", _summary(runs[n]))
    result: dict[str, Any] = dict(runs[agents])
    if small:
        result["small"] = runs[small]
        result["growth"] = {
            "agents": agents / small,
            **{
                key: runs[agents][key] / runs[small][key] if runs[small][key] else None
                for key in ("register_s", "round_overhead_s", "coordinator_peak_rss_mb")
            },
        }
    result["machine"] = _machine()
    result["seconds"] = time.perf_counter() - started
    return result


def _summary(r: dict[str, Any]) -> str:
    return (
        f"{r['updates_received']}/{r['updates_expected']} updates, register "
        f"{r['register_s']:.2f} s, overhead {r['round_overhead_s']:.3f} s/round, "
        f"peak RSS {r['coordinator_peak_rss_mb']:.0f} MB"
    )


def _raise_fd_limit(agents: int) -> None:
    """Mosquitto needs a socket per agent, and an agent process one per agent it serves: lift
    this process's soft descriptor limit (the children inherit it) as far as the hard one."""
    need = agents + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ValueError(
            f"{agents} agents need about {need} open files, but the hard limit is {hard}: "
            f"raise it (`ulimit -Hn {need}` as root, or LimitNOFILE= in a systemd unit)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def mosquitto_conf(port: int, agents: int) -> str:
    """A plaintext loopback broker for `agents` clients plus the coordinator.

    `max_queued_messages`: every agent answers a task at once, so the coordinator's queue at
    the broker may hold all N updates; beyond Mosquitto's default of 1000 it would drop them.
    """
    return (
        f"listener {port} 127.0.0.1\n"
        "max_connections -1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_packet_size 2097152\n"
        f"max_queued_messages {max(1000, 2 * agents)}\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


def _measure(agents: int, rounds: int, processes: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(port, agents))
    children: list[_Child] = []
    try:
        with MosquittoProcess(conf, port, workdir / "mosquitto.log"):
            coordinator = _Child(
                "coordinator",
                {"url": url, "agents": agents, "rounds": rounds, "state": str(workdir / "state")},
                workdir,
            )
            children.append(coordinator)
            ids = [f"b{i:05d}" for i in range(agents)]
            per = math.ceil(agents / processes)
            for k in range(processes):
                part = ids[k * per : (k + 1) * per]
                children.append(_Child("agents", {"url": url, "ids": part}, workdir, k))
            for child in children:
                child.expect("ready", timeout=120)
            t0 = time.time()
            for child in children[1:]:
                child.send("go")
            result = coordinator.expect("result", timeout=300 + rounds * 2 * DEADLINE_S)
            for child in children[1:]:
                child.send("stop")
            agent_results = [child.expect("result", timeout=60) for child in children[1:]]
    finally:
        for child in children:
            child.close()
    overhead = result["overhead_s"]
    received = sum(result["received"])
    return {
        "agents": agents,
        "rounds": rounds,
        "updates_expected": agents * rounds,
        "updates_received": received,
        "lost": agents * rounds - received,
        "register_s": result["last_registered_at"] - t0,
        "round_overhead_s": sum(overhead) / len(overhead) if overhead else 0.0,
        "coordinator_peak_rss_mb": result["peak_rss_mb"],
        "round_overhead_s_each": overhead,
        "round_s_each": result["round_s"],
        "dropped": result["dropped"],
        "max_queued_updates": result["max_queued_updates"],
        "agent_processes": processes,
        "updates_sent": sum(r["updates_sent"] for r in agent_results),
        "update_bytes": result["update_bytes"],
    }


class _Child:
    """A role's process; its stdout lines arrive on a queue, its stderr goes to a log file."""

    def __init__(self, role: str, spec: dict[str, Any], workdir: Path, index: int = 0) -> None:
        self.name = f"{role}-{index}"
        self.log = workdir / f"{self.name}.log"
        with self.log.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleet.bench_roles", role, json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> Any:
        """Wait for the line starting with `word`; return the JSON after it (or None)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._fail(f"no '{word}' within {timeout:.0f} s")
            if line is None:
                self._fail(f"exited with code {self.process.wait()} before '{word}'")
            head, _, rest = line.partition(" ")
            if head == word:
                return json.loads(rest) if rest else None

    def _fail(self, why: str) -> None:
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"bench fleet: the {self.name} process {why}; its log:\n{tail}")

    def send(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _machine() -> dict[str, Any]:
    from importlib import metadata

    from bitfleet.machine import describe_machine

    info = describe_machine()
    version = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True).stdout
    info["mosquitto"] = version.split("\n", 1)[0].removeprefix("mosquitto version ").strip()
    info["paho_mqtt"] = metadata.version("paho-mqtt")
    info["platform"] = platform.platform()
    return info


def format_table(result: dict[str, Any]) -> str:
    """The readable table printed beside the JSON: one row per fleet size, then the growth."""
    from bitfleet.machine import machine_line

    machine = result["machine"]
    runs = [result["small"], result] if "small" in result else [result]
    lines = [
        f"machine: {machine_line(machine)}; mosquitto {machine['mosquitto']}, "
        f"paho-mqtt {machine['paho_mqtt']}",
        "",
        "| agents | rounds | updates expected | received | lost | register s "
        "| overhead s/round | coordinator peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['agents']} | {r['rounds']} | {r['updates_expected']} | "
            f"{r['updates_received']} | {r['lost']} | {r['register_s']:.2f} | "
            f"{r['round_overhead_s']:.3f} | {r['coordinator_peak_rss_mb']:.1f} |"
        )
    if "growth" in result:
        g = result["growth"]

        def ratio(key: str) -> str:
            return "-" if g[key] is None else f"{g[key]:.2f}x"

        lines += [
            "",
            f"{g['agents']:.0f}x the agents: registration {ratio('register_s')}, overhead per "
            f"round {ratio('round_overhead_s')}, coordinator peak RSS "
            f"{ratio('coordinator_peak_rss_mb')}",
        ]
    lines.append(f"total: {result['seconds']:.0f} s")
    return "\n".join(lines)
