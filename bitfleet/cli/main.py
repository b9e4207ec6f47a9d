"""Entry point of the `bitfleet` command: subcommands, and errors a user can act on."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__, plugins
from ..extras import MissingExtraError
from . import bench, profile

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitfleet",
        description="Federated learning for fleets of edge boards, with hybrid PTQ/QAT and "
        "quantized ONNX models for each board.",
    )
    parser.add_argument("--version", action="version", version=f"bitfleet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench.add_parser(sub)
    profile.add_parser(sub)
    # The roles (agent, coordinator, demo) register their commands as entry points.
    for add_role_parser in plugins.load_all("bitfleet.commands").values():
        add_role_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        ValueError,
        KeyError,
        PermissionError,
        TimeoutError,
        ConnectionError,
        LookupError,
        MissingExtraError,
    ) as exc:
        # Errors a user can fix (missing data, bad values, a file where a directory belongs):
        # the message, not a traceback; -v re-raises for the traceback.
        if args.verbose:
            raise
        print(f"bitfleet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
