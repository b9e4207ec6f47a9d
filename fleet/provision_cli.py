"""`bitfleet coordinator provision`: a fleet's CA, broker certificate, accounts, ACL and config.

The coordinator's command finds this action through the `bitfleet.coordinator_actions` entry
point, so `coordinator/` never imports `fleet`. The work itself is `provision.provision`.
"""

from __future__ import annotations

import argparse


def add_parser(actions: argparse._SubParsersAction) -> None:
    """Add `provision` to the actions of `bitfleet coordinator`."""
    provision = actions.add_parser(
        "provision",
        help="write a fleet's CA, broker certificate, accounts, ACL and Mosquitto config",
        description="Generates a private CA and a server certificate, one password per device "
        "(and one for the coordinator) in a Mosquitto password file, an ACL under which each "
        "device may publish only under its own id and read only its own assignments, tasks and "
        "model, a TLS-only mosquitto.conf, and an env file and a password file for each agent and "
        "the coordinator.",
    )
    provision.add_argument("--fleet", required=True, help="fleet name (topic level)")
    provision.add_argument("--devices", required=True, type=int, metavar="N", help="device count")
    provision.add_argument("--out", required=True, metavar="DIR", help="output directory")
    provision.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOSTNAME",
        help="name or address boards use to reach the broker (repeatable; default: this "
        "machine's FQDN); localhost and 127.0.0.1 are always in the certificate",
    )
    provision.add_argument("--prefix", default="bitfleet", help="topic prefix")
    provision.add_argument(
        "--device-prefix", default="dev", help="device ids are PREFIX0 .. PREFIX<N-1>"
    )
    provision.add_argument("--port", type=int, default=8883, help="TLS listener port")
    provision.add_argument("--bind", metavar="ADDRESS", help="listen on this address only")
    provision.add_argument(
        "--days", type=int, default=1825, help="certificate validity in days (default 5 years)"
    )
    provision.add_argument(
        "--agent-ca-path",
        default="/etc/bitfleet/ca.crt",
        metavar="PATH",
        help="where boards keep ca.crt (goes into their env files)",
    )
    provision.add_argument(
        "--broker-user",
        metavar="USER",
        help="as root: owner of the files Mosquitto reads (default: mosquitto, if it exists)",
    )
    provision.add_argument(
        "--force", action="store_true", help="replace credentials already in DIR"
    )
    provision.set_defaults(run=run_provision)


def run_provision(args: argparse.Namespace) -> int:
    from .provision import default_broker_user, provision

    result = provision(
        args.fleet,
        args.devices,
        args.out,
        hosts=args.host,
        prefix=args.prefix,
        device_prefix=args.device_prefix,
        port=args.port,
        bind=args.bind,
        days=args.days,
        agent_ca_path=args.agent_ca_path,
        broker_user=args.broker_user or default_broker_user(),
        force=args.force,
    )
    out, ids = result.out, list(result.devices)
    span = ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}"
    print(
        f"fleet {result.fleet!r}: {len(ids)} devices ({span}) and the coordinator, in {out}\n"
        f"  ca.crt ca.key          private CA (keep ca.key offline; copy ca.crt to every board)\n"
        f"  server.crt server.key  broker certificate for {', '.join(result.hosts)}\n"
        f"  passwd acl             accounts (PBKDF2-SHA512) and per-device topic rules\n"
        f"  mosquitto.conf         TLS on port {result.port}, no anonymous access\n"
        f"  coordinator.env        coordinator's broker URL (no password) and --ca-file\n"
        f"  coordinator.password   its password, for LoadCredential= (deploy/README.md)\n"
        f"  devices/<id>.env       each board's /etc/bitfleet/agent.env (no password)\n"
        f"  devices/<id>.password  each board's /etc/bitfleet/broker-password\n"
        f"  credentials.json       every password (mode 0600, like the keys and password files)\n"
        f"boards connect to mqtts://{result.hosts[0]}:{result.port} (the first --host)\n"
        f"start the broker:\n"
        f"  mosquitto -c {result.conf}"
    )
    return 0
