"""Ctrl-C and SIGTERM at random moments of a real session: does the rig always end safe?

A child pytest session (the smoke suite and a good host OS update, on a copy of the
``qemu-aarch64`` rig under a name of its own) is interrupted ``--moments`` times, each at a
seeded random moment of its run, alternately with SIGINT (a bench user's Ctrl-C) and SIGTERM (a
CI job cancelled). A first, uninterrupted run times the session. Each moment is named by what
the session was doing when the signal came (``bench/phase_probe.py`` writes it down as it
goes): the test and its phase, and the rig step (flash, power on, wait for shell) or device
command (the update's among them) open then. After each signal: the session must exit within
10 s, leave no QEMU and no nbdkit (the board off, its disk's cache gone), the rig lock free and
its JUnit report written.

    .venv/bin/python bench/interrupts.py     # 20 moments; writes bench/results/interrupts.md
    .venv/bin/python bench/interrupts.py --moments 4 --no-write
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hil.lock import RigLock  # noqa: E402
from hil.qemu import board_processes  # noqa: E402

GRACE = 10.0  # seconds the session has to end after the signal
SUITES = ["suites/smoke", "suites/rollback", "-k", "smoke or good_update"]
PROBE_LINE = re.compile(r"^(\d+\.\d+) ([+-]) (.*)$")


@dataclass
class Outcome:
    moment: float
    sig: str
    phase: str
    exit_after: float | None  # None: still running after GRACE (then SIGKILLed)
    code: int | None
    leftovers: list[str]
    lock_free: bool
    # None: the signal came before pytest had configured its plugins (Python's default
    # SIGTERM ends it there): no session yet, nothing held, no report anyone could write
    report: bool | None

    @property
    def safe(self) -> bool:
        return (self.exit_after is not None and not self.leftovers and self.lock_free
                and self.report is not False)

    @property
    def report_text(self) -> str:
        return {True: "yes", False: "NO", None: "n/a (before the plugins were loaded)"}[
            self.report]


def leftovers(runtime: Path) -> list[str]:
    return [f"{pid} {program}" for pid, program in board_processes(runtime)]


class Session:
    def __init__(self, work: Path, rig_yaml: str) -> None:
        self.work = work
        self.name = f"interrupts-{os.getpid()}"
        (work / "rigs").mkdir(parents=True, exist_ok=True)
        (work / "rigs" / f"{self.name}.yaml").write_text(rig_yaml)
        self.probe = work / "phases.log"
        path = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "HIL_LOCK_DIR": str(work / "locks"),
                    "HIL_RUNTIME_DIR": str(work / "run"), "COLUMNS": "200",
                    "HIL_PHASE_FILE": str(self.probe), "PYTHONPATH": path}
        self.env.pop("HIL_RIG", None)

    def start(self, junit: Path, sig_default: bool = True) -> subprocess.Popen[str]:
        junit.unlink(missing_ok=True)
        self.probe.unlink(missing_ok=True)
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "phase_probe", "-q",
             f"--rigs-dir={self.work / 'rigs'}", f"--rig={self.name}", f"--junitxml={junit}",
             *SUITES], cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def lock_free(self) -> bool:
        os.environ["HIL_LOCK_DIR"] = self.env["HIL_LOCK_DIR"]
        return RigLock(self.name).free()


def phase_at(probe: Path, at: float) -> str:
    """What the session was doing at ``at`` (monotonic): the spans open then, outermost first
    (a test's phase, then a rig step or a command)."""
    open_spans: list[str] = []
    lines = probe.read_text().splitlines() if probe.exists() else []
    for m in map(PROBE_LINE.match, lines):
        if m is None or float(m[1]) > at:
            continue
        if m[2] == "+":
            open_spans.append(m[3])
        elif m[3] in open_spans:
            open_spans.reverse()
            open_spans.remove(m[3])  # the innermost of that title
            open_spans.reverse()
    if not open_spans:
        return "between tests (collection, the session's start or end)" if lines else \
            "pytest starting"
    return " > ".join(open_spans[:1] + open_spans[-1:] if len(open_spans) > 1 else open_spans)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moments", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="hil-interrupts-"))
    try:
        session = Session(work, (REPO / "rigs" / "qemu-aarch64.yaml").read_text())
        junit = work / "junit.xml"
        t0 = time.monotonic()
        proc = session.start(junit)
        out, _ = proc.communicate(timeout=1800)
        total = time.monotonic() - t0
        if proc.returncode != 0:
            print(out[-4000:])
            raise SystemExit(f"the uninterrupted session failed ({proc.returncode})")
        print(f"uninterrupted session: {total:.1f}s")
        results: list[Outcome] = []
        for i in range(args.moments):
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            moment = rng.uniform(0.5, total)
            proc = session.start(junit)
            started = sent = time.monotonic()
            try:
                proc.wait(timeout=moment)
                exit_after, code = 0.0, proc.returncode  # ended before the moment came
            except subprocess.TimeoutExpired:
                sent = time.monotonic()
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=GRACE)
                    exit_after, code = time.monotonic() - sent, proc.returncode
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    exit_after, code = None, None
            proc.communicate()
            runtime = work / "run"
            deadline = time.monotonic() + GRACE
            left = leftovers(runtime)
            while left and time.monotonic() < deadline:  # the kernel reaps what died with us
                time.sleep(0.1)
                left = leftovers(runtime)
            report: bool | None
            try:
                report = ET.parse(junit).getroot() is not None
            except (OSError, ET.ParseError):
                report = False if session.probe.exists() else None  # the probe: configured
            outcome = Outcome(moment, sig.name, phase_at(session.probe, sent), exit_after, code,
                              left, session.lock_free(), report)
            results.append(outcome)
            print(f"{i + 1:2d}/{args.moments} {outcome.sig:7s} at {moment:5.1f}s "
                  f"({outcome.phase}): exit {code} after "
                  f"{'-' if exit_after is None else f'{exit_after:.1f}s'}; leftovers "
                  f"{len(left)}; lock {'free' if outcome.lock_free else 'HELD'}; report "
                  f"{outcome.report_text}; {'safe' if outcome.safe else 'UNSAFE'} "
                  f"({time.monotonic() - started:.0f}s)", flush=True)
            for pid in left:
                os.kill(int(pid.split()[0]), signal.SIGKILL)
        write(results, total, args)
        return 0 if all(r.safe for r in results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(results: list[Outcome], total: float, args: argparse.Namespace) -> None:
    exits = sorted(r.exit_after for r in results if r.exit_after is not None)
    lines = [
        "# Interrupted sessions", "",
        f"`{' '.join(['.venv/bin/python', 'bench/interrupts.py', *sys.argv[1:]])}`, "
        f"{time.strftime('%Y-%m-%d')}, load {Path('/proc/loadavg').read_text().split()[:3]}", "",
        f"Session: {' '.join(SUITES)} on a copy of qemu-aarch64, {total:.0f} s uninterrupted.",
        "",
        f"**{sum(r.safe for r in results)} of {len(results)} safe** (exited within {GRACE:.0f} s "
        "of the signal, no QEMU or nbdkit left, lock free, JUnit written); slowest exit "
        f"{max(exits):.1f} s, median {exits[len(exits) // 2]:.1f} s." if exits else "", "",
        "| # | signal | at | doing (the test's phase > the step or command open) | exit code | "
        "exit after | leftovers | lock | report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {r.sig} | {r.moment:.1f} s | {r.phase} | {r.code} | "
                     f"{'-' if r.exit_after is None else f'{r.exit_after:.1f} s'} | "
                     f"{len(r.leftovers)} | {'free' if r.lock_free else 'HELD'} | "
                     f"{r.report_text} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        (REPO / "bench" / "results" / "interrupts.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
