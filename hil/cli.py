"""The ``hil`` command. Each subsystem contributes its sub-commands through ``add_commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hil.errors import ConfigError, HilError, InfraError

# Modules that add sub-commands; each defines add_commands(subparsers).
COMMAND_MODULES = (
    "hil.rigcli",
    "hil.refos.cli",
    "hil.flash.cli",
    "hil.discover",
    "hil.emu.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hil", description="pytest-hil rig and image tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subsystem not present in this build
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"hil: config error: {exc}", file=sys.stderr)
        return 2
    except InfraError as exc:
        print(f"hil: rig error: {exc}", file=sys.stderr)
        return 3
    except HilError as exc:
        print(f"hil: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
