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
    "hil.bench.cli",
    "hil.refos.cli",
    "hil.flash.cli",
    "hil.discover",
    "hil.emu.cli",
    "hil.lab.cli",
)
# Commands that one module alone defines import just that module, not every subsystem:
# `hil flash` starts in ~0.07 s instead of ~0.3 s.
SOLE_MODULE = {"flash": "hil.flash.cli"}


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hil", description="pytest-hil rig and image tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subsystem not present in this build
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # only -v precedes it
    sole = SOLE_MODULE.get(command)
    parser = build_parser([sole] if sole else COMMAND_MODULES)
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
