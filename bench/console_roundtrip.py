#!/usr/bin/env python3
"""Console round-trip benchmark: ours vs labgrid's ShellDriver vs a bare pexpect loop (the floor).

One QEMU boot of the reference OS (aarch64, the ``qemu-aarch64`` rig's QEMU command line with the
serial port moved to a TCP socket on 127.0.0.1, ``nodelay=on``, and the disk in the host's page
cache rather than behind the volatile write cache). Then, one client after another
on the SAME booted guest (connect, measure, disconnect):

- ``floor``: a raw socket and ``pexpect.fdpexpect.fdspawn``: ``sendline(cmd)``, ``expect(prompt)``,
  with the shell's own echo and prompt; nothing is parsed, no exit code is fetched.
- ``ours``: ``SerialConsole("socket://...")`` + ``ConsoleShell.run(cmd)`` (exit code, output).
- ``labgrid``: ``NetworkSerialPort(protocol="raw")`` + ``SerialDriver`` + ``ShellDriver.run(cmd)``.

Each client runs two workloads, ``echo hi`` and one with output (``dmesg | head -n 50``), each
``--n`` (output: ``--n-output``) timed commands after ``--warmup`` untimed ones. The whole
comparison is repeated ``--rounds`` times, the client order rotating, to show the noise. A last,
untimed pass measures the Python memory (tracemalloc peak) of ours and labgrid for one session.
Every reply is checked (the output must match the other clients'), so no client can win by
skipping work.

    .venv/bin/python bench/console_roundtrip.py [--n 200] [--out bench/results/console.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import pexpect
import pexpect.fdpexpect

from hil.config import DeviceType, load_rig
from hil.console.serial import SerialConsole, SerialSettings
from hil.console.shell import ConsoleShell
from hil.flash.configure import configure_image, copy_sparse
from hil.qemu.target import QemuSettings, QemuTarget, die_with_parent, free_port
from hil.registry import PartContext

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "console.md"
RIG = "qemu-aarch64"
CLIENTS = ("floor", "ours", "labgrid")
ECHO_CMD = "echo hi"
OUTPUT_CMD = "dmesg | head -n 50"
# The reference OS's prompt (PS1='root@\h:\w# '); busybox ash may follow it with ESC[6n.
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n#]*# ")
LABGRID_PROMPT = r"root@[\w.-]+:[^\r\n#]*# "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CMD_TIMEOUT = 60.0
BENCH_UUID = "b3c0c0a5010e" + "0" * 20  # the guest's config.json uuid (32 hex digits)
CONNECT_TIMEOUT = 15.0


# --- the guest ------------------------------------------------------------------------------------

@dataclass
class ShellState:
    """What the console shell looked like before any client touched it, to put back after ours
    (which turns echo and the prompt off for its session)."""

    term: str
    ps1: str
    stty: str

    def restore_line(self) -> bytes:
        return (f"stty {shlex.quote(self.stty)}; PS1={shlex.quote(self.ps1)}; PS2='> '; "
                f"export TERM={shlex.quote(self.term)}\n").encode()


class Guest:
    """The reference OS booted once in QEMU, its serial console on 127.0.0.1:``port``."""

    def __init__(self, workdir: Path, boot_timeout: float, *, nagle: bool = False) -> None:
        self.workdir = workdir
        self.nagle = nagle
        self.boot_timeout = boot_timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.qemu_log = workdir / "qemu.log"
        self.rig = load_rig(RIG)
        self.device_type: DeviceType = self.rig.device_type
        self.state: ShellState | None = None
        self.qemu_version = ""
        self.image_name = ""
        self.boot_seconds = 0.0

    def command(self, disk: Path) -> list[str]:
        """The rig's own QEMU command line (``QemuTarget.command()``), console moved to TCP."""
        settings = self.rig.parts["target"].settings
        assert isinstance(settings, QemuSettings)
        runtime = self.workdir / "qemu"
        runtime.mkdir()
        # the disk straight in the host's page cache: the rig's default volatile write cache
        # needs its nbdkit, which only a powered QemuTarget starts, and no disk is measured here
        target = QemuTarget(settings.model_copy(update={"disk": disk, "write_cache": "host"}),
                            PartContext(RIG, "target", runtime, self.device_type))
        try:
            cmd = target.command()
        finally:
            target.console.close()  # its reader thread; this board never starts through it
        chardev = [i for i, arg in enumerate(cmd) if arg.startswith("socket,id=con0,")]
        if len(chardev) != 1:
            raise RuntimeError(f"no console chardev in the QEMU command line: {cmd}")
        # nodelay: without it QEMU's Nagle and the client's delayed ACK add ~40 ms to most round
        # trips of every client (an empty line took 44 ms), hiding what is being measured.
        cmd[chardev[0]] = (f"socket,id=con0,host=127.0.0.1,port={self.port},server=on,wait=off"
                           + ("" if self.nagle else ",nodelay=on"))
        return cmd

    def start(self) -> None:
        from hil.refos import build

        image = build("aarch64")
        self.image_name = f"refos {image.arch} {image.version} ({image.key[:12]})"
        # A fixed config: configure_image caches one prepared image per config, so every run
        # of this benchmark reuses the same one instead of adding 512 MiB to the cache.
        config = {"uuid": BENCH_UUID, "deviceType": self.device_type.slug,
                  "developmentMode": True, "persistentLogging": False}
        prepared = configure_image(image.disk, config)
        disk = self.workdir / "disk.img"
        copy_sparse(prepared, disk)
        cmd = self.command(disk)
        self.qemu_version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True,
                                           check=True).stdout.splitlines()[0]
        t0 = time.monotonic()
        with self.qemu_log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        with self.raw() as child:
            try:
                self._boot(child, t0)
            except (pexpect.TIMEOUT, pexpect.EOF) as exc:
                seen = (child.before or b"")[-1500:].decode(errors="replace")
                raise RuntimeError(f"the guest did not reach a shell ({type(exc).__name__}); "
                                   f"console tail:\n{seen}\nQEMU log tail:\n{self.log_tail()}"
                                   ) from None

    def _boot(self, child: pexpect.fdpexpect.fdspawn, t0: float) -> None:
        # Never press Enter during U-Boot's countdown: wait for the OS to say it is up.
        child.expect(rb"HIL-READY [^\r\n]*", timeout=self.boot_timeout)
        self.boot_seconds = time.monotonic() - t0
        quiet(child, 1.0)
        child.sendline(b"")
        child.expect(PROMPT, timeout=CMD_TIMEOUT)
        quiet(child, 0.5)
        child.sendline(rb"""printf '\036CAP %s|%s|%s\037\n' "$TERM" "$PS1" "$(stty -g)" """)
        child.expect(rb"\x1eCAP ([^|]*)\|([^|]*)\|([^\x1f]*)\x1f", timeout=CMD_TIMEOUT)
        term, ps1, stty = (g.decode() for g in child.match.groups())
        self.state = ShellState(term, ps1, stty)
        child.expect(PROMPT, timeout=CMD_TIMEOUT)
        quiet(child, 0.3)

    def connect(self) -> socket.socket:
        """A TCP connection to the console (QEMU serves one client at a time)."""
        end = time.monotonic() + CONNECT_TIMEOUT
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=2)
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)

    @contextlib.contextmanager
    def raw(self) -> Iterator[pexpect.fdpexpect.fdspawn]:
        sock = self.connect()
        sock.settimeout(None)
        child = pexpect.fdpexpect.fdspawn(sock.detach(), timeout=CMD_TIMEOUT, maxread=65536,
                                          searchwindowsize=4096)
        try:
            yield child
        finally:
            child.close()

    def log_tail(self) -> str:
        try:
            return "\n".join(self.qemu_log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no QEMU log)"

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def quiet(child: pexpect.fdpexpect.fdspawn, seconds: float, limit: float = 30.0) -> None:
    """Read until the console has been silent for ``seconds`` (at most ``limit`` seconds)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            child.read_nonblocking(65536, timeout=seconds)
        except pexpect.TIMEOUT:
            return
    raise RuntimeError(f"the console never fell silent for {seconds} s within {limit} s")


# --- the clients ----------------------------------------------------------------------------------

class Client(Protocol):
    name: str

    def connect(self) -> None: ...

    def run(self, command: str) -> str: ...

    def traffic(self) -> tuple[int, int] | None:
        """Console bytes and reads so far, where the client keeps count."""

    def close(self) -> None: ...


class Floor:
    """The least any console client can do: write the line, wait for the next prompt."""

    name = "floor"

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.child: pexpect.fdpexpect.fdspawn | None = None

    def connect(self) -> None:
        sock = self.guest.connect()
        sock.settimeout(None)
        self.child = pexpect.fdpexpect.fdspawn(sock.detach(), timeout=CMD_TIMEOUT,
                                               maxread=65536, searchwindowsize=512)
        self.child.sendline(b"")
        self.child.expect(PROMPT)

    def run(self, command: str) -> str:
        assert self.child is not None
        self.child.sendline(command.encode())
        self.child.expect(PROMPT)
        before: bytes = self.child.before
        # before = [ESC[6n] + the echoed command line + the output: drop the echo for the check
        lines = ANSI.sub("", before.decode(errors="replace")).replace("\r", "").split("\n")
        return "\n".join(lines[1:])

    def traffic(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
            self.child = None


class Ours:
    name = "ours"

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.console: SerialConsole | None = None
        self.shell: ConsoleShell | None = None

    def connect(self) -> None:
        runtime = Path(tempfile.mkdtemp(prefix="ours-", dir=self.guest.workdir))
        ctx = PartContext("bench", "console", runtime, self.guest.device_type)
        self.console = SerialConsole(
            SerialSettings(url=f"socket://127.0.0.1:{self.guest.port}"), ctx)
        self.console.attach(timeout=CONNECT_TIMEOUT)
        self.shell = ConsoleShell(self.console)
        self.shell.wait_ready(CMD_TIMEOUT)

    def run(self, command: str) -> str:
        assert self.shell is not None
        result = self.shell.run(command, timeout=CMD_TIMEOUT)
        if result.exit_code != 0:
            raise RuntimeError(f"ours: {command!r} exited {result.exit_code}")
        return result.stdout

    def traffic(self) -> tuple[int, int] | None:
        # ConsoleLog keeps one (offset, time) entry per chunk the reader thread appended.
        assert self.console is not None
        log = self.console.log
        return log.end, len(getattr(log, "_chunks", ()))

    def close(self) -> None:
        console, self.console, self.shell = self.console, None, None
        if console is None:
            return
        try:
            # Put echo and the prompt back for the next client; wait until the shell took it.
            assert self.guest.state is not None
            at = console.log.end
            console.write(self.guest.state.restore_line())
            console.log.wait_for(PROMPT, at, CMD_TIMEOUT, "the prompt back after ours")
        finally:
            console.close()


class Labgrid:
    name = "labgrid"

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.target: Any = None
        self.shell: Any = None
        self.sessions = 0

    def connect(self) -> None:
        from labgrid import Target
        from labgrid.driver import SerialDriver, ShellDriver
        from labgrid.resource import NetworkSerialPort

        self.sessions += 1
        self.target = Target(f"bench-{self.sessions}")
        NetworkSerialPort(self.target, name=None, host="127.0.0.1", port=self.guest.port,
                          speed=115200, protocol="raw")
        SerialDriver(self.target, name=None)
        self.shell = ShellDriver(self.target, name=None, prompt=LABGRID_PROMPT,
                                 login_prompt=r"login: ", username="root",
                                 login_timeout=int(CMD_TIMEOUT))
        self.target.activate(self.shell)

    def run(self, command: str) -> str:
        stdout, _, code = self.shell.run(command, timeout=CMD_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"labgrid: {command!r} exited {code}")
        return "".join(line + "\n" for line in stdout)

    def traffic(self) -> tuple[int, int] | None:
        return None

    def close(self) -> None:
        target, self.target, self.shell = self.target, None, None
        if target is not None:
            target.cleanup()


# --- measuring ------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One client's session in one round, per workload: seconds per command (wall), host CPU
    seconds per command (this process, all threads), and for ours the console traffic."""

    client: str
    round: int
    load: float  # 1-minute load average at the start of the session
    connect: float
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, tuple[float, float]] = field(default_factory=dict)  # bytes, reads per cmd


def normalize(text: str) -> list[str]:
    return [ln.rstrip() for ln in ANSI.sub("", text).replace("\r", "").split("\n") if ln.strip()]


class Checker:
    """Every client's reply must be the same lines (the first one seen is the reference)."""

    def __init__(self) -> None:
        self.reference: dict[str, list[str]] = {}
        self.mismatches: dict[tuple[str, str], int] = {}
        self.checked = 0

    def check(self, client: str, workload: str, reply: str) -> None:
        self.checked += 1
        lines = normalize(reply)
        ref = self.reference.setdefault(workload, lines)
        if lines != ref:
            key = (client, workload)
            self.mismatches[key] = self.mismatches.get(key, 0) + 1
            if self.mismatches[key] == 1:
                print(f"  ! {client} {workload}: reply differs from the reference "
                      f"({len(lines)} lines vs {len(ref)})", flush=True)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def session(client: Client, workloads: dict[str, str], counts: dict[str, int], warmup: int,
            rnd: int, checker: Checker) -> Sample:
    load = loadavg()
    t0 = time.perf_counter()
    client.connect()
    sample = Sample(client.name, rnd, load, time.perf_counter() - t0)
    try:
        for workload, command in workloads.items():
            for _ in range(warmup):
                checker.check(client.name, workload, client.run(command))
            n = counts[workload]
            times: list[float] = []
            replies: list[str] = []
            gc.collect()
            before = client.traffic()
            cpu = time.process_time()
            for _ in range(n):
                start = time.perf_counter()
                replies.append(client.run(command))
                times.append(time.perf_counter() - start)
            sample.cpu[workload] = (time.process_time() - cpu) / n
            after = client.traffic()
            if before is not None and after is not None:
                sample.traffic[workload] = ((after[0] - before[0]) / n,
                                            (after[1] - before[1]) / n)
            sample.times[workload] = times
            for reply in replies:
                checker.check(client.name, workload, reply)
    finally:
        client.close()
    return sample


def memory(make: Callable[[], Client], workloads: dict[str, str], counts: dict[str, int]
           ) -> tuple[int, int, int | None]:
    """tracemalloc peak and what is still held at the end of a session (untimed), and the
    console bytes of the session where the client counts them."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        client = make()
        client.connect()
        try:
            for workload, command in workloads.items():
                for _ in range(counts[workload]):
                    client.run(command)
            held = tracemalloc.get_traced_memory()[0] - base
            traffic = client.traffic()
        finally:
            client.close()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, held, traffic[0] if traffic else None


# --- the report -----------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def cell(command: str) -> str:
    """A command as code in a markdown table cell (a bare | would end the cell)."""
    return "`" + command.replace("|", "\\|") + "`"


def p90(data: list[float]) -> float:
    return statistics.quantiles(data, n=10, method="inclusive")[8] if len(data) > 1 else data[0]


def pooled(samples: list[Sample], client: str, workload: str) -> list[float]:
    return [t for s in samples if s.client == client for t in s.times[workload]]


def round_median(samples: list[Sample], client: str, workload: str, rnd: int) -> float:
    return statistics.median(next(s for s in samples if s.client == client and s.round == rnd)
                             .times[workload])


def command_line() -> str:
    args = [a.replace(str(REPO) + os.sep, "").replace(str(Path.home()), "~")
            for a in sys.argv[1:]]
    return shlex.join(["python", "bench/console_roundtrip.py", *args])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def render(samples: list[Sample], workloads: dict[str, str], mem_counts: dict[str, int],
           args: argparse.Namespace, guest: Guest, loads: tuple[str, str],
           mem: dict[str, tuple[int, int, int | None]], checker: Checker, started: datetime.datetime
           ) -> str:
    rounds = sorted({s.round for s in samples})
    lines = [
        "# Console round trip",
        "",
        f"`{command_line()}`, {started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), kernel {platform.release()}, "
        f"{guest.qemu_version}, Python {platform.python_version()}, labgrid "
        f"{version('labgrid')}, pexpect {version('pexpect')}, pyserial "
        f"{version('pyserial')}{' (pyserial-labgrid ' + version('pyserial-labgrid') + ')' if version('pyserial-labgrid') != '?' else ''}.",  # noqa: E501
        f"Load (`/proc/loadavg`): `{loads[0]}` at the start, `{loads[1]}` at the end; the "
        "1-minute figure at the start of each session is in the per-round table. The CPUs were "
        "shared with other QEMU runs unless the load says otherwise.",
        "",
        f"Guest: {guest.image_name} on the `{RIG}` rig's QEMU command line (TCG, "
        "`virt`, cortex-a53, 1 vCPU), booted once "
        f"({guest.boot_seconds:.1f} s to `HIL-READY`); its pl011 console on a QEMU TCP "
        "chardev on 127.0.0.1"
        + (" (QEMU's default `nodelay=off`)" if guest.nagle else
           " with `nodelay=on` (without it, Nagle on QEMU's side and the clients' delayed ACKs "
           "added ~40 ms to nearly every round trip: an empty line took 44 ms instead of 3; "
           "`--nagle` measures that)")
        + ", busybox ash as root. The clients take turns on that one shell "
        f"(connect, measure, disconnect), {len(rounds)} rounds, order rotating. Per client and "
        f"round: {args.warmup} untimed warm-up commands, then the timed ones. Times are wall "
        "time of one call per command, in ms.",
        "",
        "- **floor**: raw TCP socket + `pexpect.fdpexpect.fdspawn`: `sendline(cmd)`, "
        "`expect(prompt)`, with the shell's echo and prompt on (no exit code, no parsing).",
        "- **ours**: `SerialConsole(\"socket://127.0.0.1:P\")` + `ConsoleShell.run(cmd)`: "
        "exit code, output decoded, checked for reboots.",
        "- **labgrid**: `NetworkSerialPort(protocol=\"raw\")` + `SerialDriver` + "
        "`ShellDriver.run(cmd)`: exit code, output lines.",
        "",
        "## Summary (all rounds pooled)",
        "",
        "| workload | client | n | median | p90 | mean | host CPU | ours / this (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdict: list[str] = []
    for workload, command in workloads.items():
        ours_med = statistics.median(pooled(samples, "ours", workload))
        for client in CLIENTS:
            data = pooled(samples, client, workload)
            med = statistics.median(data)
            ratio = "" if client == "ours" else f"{ours_med / med:.2f}"
            cpu = statistics.median(s.cpu[workload] for s in samples if s.client == client)
            lines.append(f"| {cell(command)} | {client} | {len(data)} | {ms(med)} | "
                         f"{ms(p90(data))} | {ms(statistics.fmean(data))} | {ms(cpu)} | "
                         f"{ratio} |")
        lab = ours_med / statistics.median(pooled(samples, "labgrid", workload))
        floor = ours_med / statistics.median(pooled(samples, "floor", workload))
        verdict.append(
            f"- `{command}`: ours / labgrid = **{lab:.2f}** (target ≤ 0.33: "
            f"{'met' if lab <= 1 / 3 else 'NOT met'}), ours / floor = **{floor:.2f}** "
            f"(target ≤ 1.3: {'met' if floor <= 1.3 else 'NOT met'}).")
    lines += ["", "Wall time per command in ms. Host CPU: CPU time of the benchmark process (all "
              "its threads) per command, median over the rounds; it is what a client costs the "
              "machine, and it is far less sensitive to the load than the wall time."]
    traffic = {w: [s.traffic[w] for s in samples if s.client == "ours" and w in s.traffic]
               for w in workloads}
    if all(traffic.values()):
        lines.append("Console traffic of ours per command, median over the rounds: "
                     + "; ".join(f"`{workloads[w]}` {statistics.median(b for b, _ in t):.0f} "
                                 f"bytes in {statistics.median(r for _, r in t):.0f} reads by "
                                 "its reader thread" for w, t in traffic.items()) + ".")
    lines += ["", "Issue 6's targets (median per command):", "", *verdict, "",
              "## Per round", "",
              "Median ms per command; the ratios are within the round (the three sessions of a "
              "round ran back to back, so they saw about the same load).", "",
              "| round | order | workload | load | floor | ours | labgrid | ours / labgrid | "
              "ours / floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    for rnd in rounds:
        order = " → ".join(s.client for s in samples if s.round == rnd)
        for workload, command in workloads.items():
            meds = {c: round_median(samples, c, workload, rnd) for c in CLIENTS}
            load = " / ".join(f"{s.load:.2f}" for s in samples if s.round == rnd)
            lines.append(f"| {rnd + 1} | {order} | {cell(command)} | {load} | "
                         f"{ms(meds['floor'])} | {ms(meds['ours'])} | {ms(meds['labgrid'])} | "
                         f"{meds['ours'] / meds['labgrid']:.2f} | "
                         f"{meds['ours'] / meds['floor']:.2f} |")
    connects = {c: statistics.median(s.connect for s in samples if s.client == c)
                for c in CLIENTS}
    lines += ["", "Connect (median over rounds, not part of the per-command figures): "
              + ", ".join(f"{c} {connects[c]:.2f} s" for c in CLIENTS)
              + ". Ours waits for 1.5 s of console silence before it presses Enter (it never "
              "interrupts a bootloader countdown), labgrid for 2 s.", ""]
    if mem:
        lines += ["## Memory", "",
                  "Python allocations (`tracemalloc`) over one more session per client, untimed: "
                  "connect, "
                  + ", ".join(f"{mem_counts[w]} x `{c}`" for w, c in workloads.items())
                  + ", disconnect. Ours keeps the session's console log (`ConsoleLog`: the "
                  "per-test console slices and failure tails come from it) until it closes, "
                  "so what it holds grows with the console traffic.", "",
                  "| client | peak | held before disconnect | console bytes in the session |",
                  "|---|---|---|---|"]
        for client, (peak, held, nbytes) in mem.items():
            lines.append(f"| {client} | {peak / 1024:.0f} KiB | {held / 1024:.0f} KiB | "
                         f"{'' if nbytes is None else nbytes} |")
        lines.append("")
    if checker.mismatches:
        lines += ["Replies that differed from the reference (kernel messages on the console?): "
                  + ", ".join(f"{c} `{w}` x{n}" for (c, w), n in checker.mismatches.items()),
                  ""]
    else:
        lines += [f"All {checker.checked} replies matched (the same lines from every client for "
                  "the same command).", ""]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------

def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that kills QEMU


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="timed `echo hi` per client and round")
    parser.add_argument("--n-output", type=int, default=None,
                        help="timed output commands per client and round (default: --n / 4)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-cmd", default=OUTPUT_CMD)
    parser.add_argument("--boot-timeout", type=float, default=300.0)
    parser.add_argument("--nagle", action="store_true",
                        help="leave QEMU's console socket at nodelay=off (its default)")
    parser.add_argument("--mem-n", type=int, default=40,
                        help="`echo hi` in the memory pass (output commands: a quarter)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.n < 2 or args.rounds < 1:
        parser.error("--n must be at least 2 and --rounds at least 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    workloads = {"echo": ECHO_CMD, "output": args.output_cmd}
    counts = {"echo": args.n, "output": args.n_output or max(2, args.n // 4)}
    mem_counts = {"echo": args.mem_n, "output": max(1, args.mem_n // 4)}
    started = datetime.datetime.now(datetime.UTC)
    load_start = Path("/proc/loadavg").read_text().strip()
    workdir = Path(tempfile.mkdtemp(prefix="hil-bench-console-"))
    guest = Guest(workdir, args.boot_timeout, nagle=args.nagle)
    makers: dict[str, Callable[[], Client]] = {
        "floor": lambda: Floor(guest), "ours": lambda: Ours(guest),
        "labgrid": lambda: Labgrid(guest)}
    clients = {name: make() for name, make in makers.items()}
    checker = Checker()
    samples: list[Sample] = []
    mem: dict[str, tuple[int, int, int | None]] = {}
    try:
        print(f"booting the guest (workdir {workdir}) ...", flush=True)
        guest.start()
        print(f"  {guest.qemu_version}; at a shell after {guest.boot_seconds:.1f} s", flush=True)
        for rnd in range(args.rounds):
            order = CLIENTS[rnd % 3:] + CLIENTS[:rnd % 3]
            for name in order:
                sample = session(clients[name], workloads, counts, args.warmup, rnd, checker)
                samples.append(sample)
                print(f"round {rnd + 1}/{args.rounds} {name:8} load {sample.load:5.2f}  "
                      + "  ".join(f"{w} median {ms(statistics.median(t))} ms"
                                  for w, t in sample.times.items()), flush=True)
        if not args.no_memory:
            for name in ("ours", "labgrid"):
                mem[name] = memory(makers[name], workloads, mem_counts)
                print(f"memory {name}: peak {mem[name][0] / 1024:.0f} KiB", flush=True)
    finally:
        guest.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = Path("/proc/loadavg").read_text().strip()
    report = render(samples, workloads, mem_counts, args, guest, (load_start, load_end), mem,
                    checker, started)
    print(report)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; QEMU killed", file=sys.stderr)
        sys.exit(130)
