#!/usr/bin/env python3
"""Suite speed benchmark: wall time per suite and per boot on each QEMU board.

Runs ``pytest --rig=BOARD suites`` for each board in turn (the reference OS image, as
``make demo`` does) and reads what every session prints at its end: the rig timeline (each
``wait for shell`` is one boot, power-on or reboot to a root shell), the split of the session's
time (waiting on the device / rig hardware / framework) and ``time by suite``. Writes a
markdown report to ``bench/results/suites.md`` with the command, the load and the pytest
outcome, so figures taken next to other QEMU guests can be told apart.

    .venv/bin/python bench/suites.py [--boards qemu-aarch64 qemu-x86_64] [--suites suites]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "suites.md"
BOOT = re.compile(r"^\s+([0-9.]+)s\s+ok\s+wait for shell", re.M)
SPLIT = re.compile(r"^time: .*$", re.M)
SUITE = re.compile(r"^\s{2}(\S+(?: \S+)?)\s+([0-9.]+)s\s+device\s+([0-9.]+)s \(\s*\d+%\)\s+"
                   r"hardware\s+([0-9.]+)s\s+framework\s+([0-9.]+)s", re.M)
OUTCOME = re.compile(r"^=*\s*(\d+ (?:passed|failed)[^=]*?)\s*=*$", re.M)


@dataclass
class Board:
    name: str
    wall: float = 0.0
    rc: int = 0
    outcome: str = ""
    split: str = ""
    boots: list[float] = field(default_factory=list)
    suites: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    load: tuple[str, str] = ("", "")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_board(name: str, suites: str, pytest: list[str]) -> Board:
    b = Board(name)
    before = loadavg()
    t0 = time.monotonic()
    proc = subprocess.run([*pytest, "-p", "no:cacheprovider", "-q", f"--rig={name}", suites],
                          cwd=REPO, capture_output=True, text=True)
    b.wall, b.rc = time.monotonic() - t0, proc.returncode
    b.load = (before, loadavg())
    out = proc.stdout
    b.boots = [float(x) for x in BOOT.findall(out)]
    b.split = (SPLIT.findall(out) or [""])[-1]
    b.suites = [(s, float(w), float(d), float(h), float(f))
                for s, w, d, h, f in SUITE.findall(out)]
    b.outcome = (OUTCOME.findall(out) or [f"pytest exit {proc.returncode}"])[-1]
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:])
    return b


def report(boards: list[Board], command: str) -> str:
    lines = ["# Suite speed", "",
             f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Machine: {os.cpu_count()} CPUs, kernel {platform.release()}, "
             f"Python {platform.python_version()}.", ""]
    for b in boards:
        boots = (f"{len(b.boots)} boots, median {statistics.median(b.boots):.1f} s, "
                 f"{sum(b.boots):.0f} s in all" if b.boots else "no boots seen")
        lines += [f"## {b.name}", "",
                  f"{b.outcome} (exit {b.rc}), {b.wall / 60:.1f} min wall; {boots}. "
                  f"Load {b.load[0]} before, {b.load[1]} after.", "",
                  f"`{b.split}`", "",
                  "| suite | wall | device | hardware | framework |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {w:.1f} s | {d:.1f} s | {h:.1f} s | {f:.1f} s |"
                  for s, w, d, h, f in b.suites]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", nargs="+", default=["qemu-aarch64", "qemu-x86_64"])
    parser.add_argument("--suites", default="suites")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()
    pytest = [sys.executable, "-m", "pytest"]
    boards = [run_board(name, args.suites, pytest) for name in args.boards]
    command = "python bench/suites.py " + shlex.join(
        ["--boards", *args.boards, "--suites", args.suites])
    text = report(boards, command)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text + "\n")
    return max(b.rc for b in boards)


if __name__ == "__main__":
    raise SystemExit(main())
