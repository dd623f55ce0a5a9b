"""``hil emu start RIG``: run a rig's emulated hardware in the foreground until Ctrl-C, for a
person trying the tool without a board (``pytest --rig=RIG`` in another terminal then uses it).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from hil.cache import runtime_dir


def add_commands(subparsers: Any) -> None:
    emu = subparsers.add_parser("emu", help="emulated bench hardware (relay, PDU, SD mux, "
                                "ser2net, QEMU board)")
    sub = emu.add_subparsers(dest="emu_command", required=True, metavar="ACTION")
    start = sub.add_parser("start", help="run a rig's emulated hardware until Ctrl-C")
    start.add_argument("rig", help="rig name or rig file with an emulator: section")
    start.add_argument("--rigs-dir", help="where rig names are looked up")
    start.add_argument("--runtime", type=Path, help="runtime directory (default: the rig's, "
                       "as the pytest plugin uses it)")
    start.set_defaults(func=_start)


def _stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the bench's context exit stops every child process


def _start(args: argparse.Namespace) -> int:
    from hil.config import load_rig
    from hil.emu.bench import Bench

    rig = load_rig(args.rig, args.rigs_dir)
    if not rig.emulator:
        print(f"hil: rig {rig.name} ({rig.source}) has no emulator: section", file=sys.stderr)
        return 2
    runtime = args.runtime or runtime_dir("rigs", rig.name)
    # SIGINT too: a shell starts background jobs with it ignored, and we inherit that
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    with Bench(rig, runtime) as bench:
        print(f"emulated bench for rig {rig.name} is up:")
        for line in bench.describe():
            print(f"  {line}")
        print("Ctrl-C stops it.", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            print("\nstopping", file=sys.stderr)
    return 0
