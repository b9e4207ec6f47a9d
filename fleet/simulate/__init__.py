"""`bitfleet simulate`: many virtual boards in one process, through the daemon's own code.

Each method of an experiment is one federated job run by `Coordinator`, the class behind
`bitfleet coordinator serve`, against virtual devices that are the boards' own `EdgeAgent`s
(found through the `bitfleet.agents` entry point). An in-process bus replaces MQTT; `--broker`
runs the same experiment over a real broker instead. Nothing here aggregates, allocates or
trains: it builds the fleet, runs the methods, and evaluates and reports what they produced.

Time (docs/simulation.md#the-board-clock): the host's step time is measured once per local method; a
virtual board's training time is that scaled by the board's relative speed and, for methods that run
the fake quantizer, by the board's QAT overhead from its profile. The coordinator adds transfer time
from the link bandwidth and takes the slowest participant per round. Reports show this simulated
board clock beside the host's wall clock and say which is which.

Modules, in the order a run uses them:

    experiment       the experiment file: `load_experiment`, `Experiment`, `SimDevice`, seeds
    virtual_fleet    the virtual boards: data slices, profiles, board clock, `HostCompute`
    run              one method as a federated job: `run_method`
    results          results.json: each method's entry, captures, summaries, seed means
    experiment_run   every method and ablation over every seed: `run_experiment`
    report           report.md from results.json; `plots` and `report_format` serve it
    cli              the command's arguments
"""
