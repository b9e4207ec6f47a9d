"""`bitfleet agent run`: the board's side of the fleet, as a long-running command."""

from __future__ import annotations

import argparse
import signal

from bitfleet.protocol.credentials import BROKER_ENV, PASSWORD_FILE_HELP, resolve_broker


def add_parser(sub: argparse._SubParsersAction) -> None:
    agent = sub.add_parser("agent", help="run the agent on a board (or a virtual board)")
    actions = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run",
        help="profile this board, register, train what the coordinator assigns, get the model",
        description="Connects to the broker, measures this board, registers with its data "
        "summary (never samples), trains each task with its assigned strategy and bits, uploads "
        "updates, and stores the final quantized ONNX model. Reconnects on broker loss.",
    )
    run.add_argument(
        "--broker",
        metavar="URL",
        help=f"mqtt://[user@]host[:port] or mqtts://... (default ${BROKER_ENV}); the password "
        "does not belong here (see --password-file)",
    )
    run.add_argument("--password-file", metavar="PATH", help=PASSWORD_FILE_HELP)
    run.add_argument(
        "--data",
        required=True,
        metavar="DIR|NAME:I/N",
        help="a folder with this device's data (IDX files of --dataset), or part I of N of a "
        "named data set for a virtual device, e.g. fashion-mnist:0/6",
    )
    run.add_argument("--dataset", default="fashion-mnist", help="data set format of --data DIR")
    run.add_argument("--device-id", help="default: a stable id kept in --state-dir")
    run.add_argument("--profile", default="auto", help="board profile name, or auto (detect)")
    run.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet"])
    run.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha for NAME:I/N")
    run.add_argument("--partition-seed", type=int, default=0)
    run.add_argument(
        "--validation-fraction",
        type=float,
        metavar="F",
        help="for NAME:I/N: the share of the training images the coordinator holds back for "
        "validation, its [data] validation_fraction (default 0.1, the job's default); the "
        "parts split the rest",
    )
    run.add_argument("--fleet", default="default", help="fleet name (topic prefix)")
    run.add_argument("--out-dir", default="bitfleet-models", help="where the final model goes")
    run.add_argument("--state-dir", help="where the device id is kept")
    run.add_argument("--ca-file", help="CA certificate for mqtts://")
    run.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    run.add_argument(
        "--chunk-kib",
        type=int,
        default=1024,
        metavar="KIB",
        help="upload chunk size in KiB, 1..1024 (default 1024); smaller chunks suit slow, "
        "flaky links: a lost connection resends less",
    )
    limits = run.add_argument_group(
        "owner's limits",
        "what this board's model may be (docs/export.md#deploy-candidates): the coordinator "
        "gives it the most accurate candidate that meets them, and fewer bits only where a "
        "limit requires it",
    )
    limits.add_argument(
        "--max-model-kib",
        type=float,
        metavar="KIB",
        help="largest model file in KiB (e.g. an over-the-air update budget); default: none",
    )
    limits.add_argument(
        "--max-latency-ms",
        type=float,
        metavar="MS",
        help="longest inference at batch 1 on this board, in ms; default: none",
    )
    run.add_argument(
        "--no-step-measure", action="store_true", help="skip measuring step times at start"
    )
    run.add_argument(
        "--exit-after-model", action="store_true", help="exit once the final model arrived"
    )
    run.set_defaults(run=run_agent)


def run_agent(args: argparse.Namespace) -> int:
    from bitfleet.data.availability import check_available
    from bitfleet.deploy import DeployLimits

    from .agent import NAMED_PART, AgentOptions, EdgeAgent

    # Bad settings fail here, in one line, before any slow set-up or connection.
    address = resolve_broker(args.broker, args.password_file)
    if not 1 <= args.chunk_kib <= 1024:
        raise ValueError(f"--chunk-kib must be in 1..1024, got {args.chunk_kib}")
    for flag, value in (
        ("--max-model-kib", args.max_model_kib),
        ("--max-latency-ms", args.max_latency_ms),
    ):
        if value is not None and not 0 < value < 1e9:
            raise ValueError(f"{flag} must be a positive number, got {value:g}")
    kib = args.max_model_kib
    limits = DeployLimits(None if kib is None else round(kib * 1024), args.max_latency_ms)
    named = NAMED_PART.fullmatch(args.data)
    if named is None:
        check_available(args.dataset, args.data)
    else:
        check_available(named.group(1))
    agent = EdgeAgent(
        AgentOptions(
            broker=address,
            data=args.data,
            device_id=args.device_id,
            dataset=args.dataset,
            partition=args.partition,
            alpha=args.alpha,
            partition_seed=args.partition_seed,
            validation_fraction=AgentOptions.validation_fraction
            if args.validation_fraction is None
            else args.validation_fraction,
            profile=args.profile,
            out_dir=args.out_dir,
            state_dir=args.state_dir,
            fleet=args.fleet,
            ca_file=args.ca_file,
            measure_steps=not args.no_step_measure,
            exit_after_model=args.exit_after_model,
            threads=args.threads,
            chunk_size=args.chunk_kib * 1024,
            limits=limits,
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    return agent.run()
