"""What each test did, taken once from the rig's console log and timeline, for the reports
(allure's attachments, ``--hil-report``'s page): the commands it ran on the device, the rig's
steps in its span and each boot's steps as the console timed them. Everything a record holds
is masked (``hil.redact``) and readable (no terminal control sequences): the writers only
escape it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from html import escape

from hil import redact
from hil.console.log import NO_REPLY, CommandRun, ConsoleLog, EventKind, readable, typed
from hil.errors import brief
from hil.rig import Step

# A boot's steps as the console shows them, in the order they normally come. Each is the
# first match after the boot's start (a power-on, or the kernel saying it restarts).
BOOT_STEPS: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("firmware", re.compile(rb"U-Boot 20\d\d|SeaBIOS \(version")),
    ("bootloader chose a root", re.compile(rb"HIL-BOOT: ")),  # the reference OS's bootloader
    # the bootloader handing over (a quiet kernel prints nothing of its own until init)
    ("kernel", re.compile(rb"Starting kernel \.\.\.|Booting the kernel|Booting Linux on "
                          rb"physical CPU|Linux version \d")),
    ("init", re.compile(rb"Run /\S*init as init process|HIL-INIT|systemd\[1\]: "
                        rb"|Welcome to (?!GRUB)")),
    # the framework's shell answered its set-up line (hil.console.shell)
    ("shell", re.compile(rb"\x1eR[0-9a-f]+\x1f")),
    ("services healthy", re.compile(rb"HIL-READY ")),  # the reference OS's health signal
)
# where a boot starts: the board got power, its kernel restarted it, or panicked (a kernel
# that restarts after a panic says so only with its banner)
BOOT_ORIGINS = {EventKind.POWER_ON: "power on", EventKind.RESET: "restart",
                EventKind.PANIC: "panic"}
CONSOLE_EVENTS = (EventKind.CONSOLE_LOST, EventKind.CONSOLE_BACK)


@dataclass(frozen=True)
class RigEvent:
    name: str
    part: str
    seconds: float
    ok: bool
    text: str = ""  # a flash's throughput and verify result, a failed step's error


@dataclass(frozen=True)
class BootStep:
    name: str
    at: float  # seconds after the boot's start
    took: float  # seconds since the step before (the boot's start for the first)


@dataclass(frozen=True)
class Boot:
    origin: str  # "power on", "restart" or "panic"
    steps: tuple[BootStep, ...]

    @property
    def seconds(self) -> float:
        return self.steps[-1].at if self.steps else 0.0


@dataclass
class TestRecord:
    nodeid: str
    outcome: str  # passed, failed, error (setup or teardown), infra, skipped
    seconds: float = 0.0
    error: str = ""
    console: str = ""
    commands: list[CommandRun] = field(default_factory=list)  # masked copies
    events: list[RigEvent] = field(default_factory=list)
    boots: list[Boot] = field(default_factory=list)


@dataclass(frozen=True)
class SessionInfo:
    rig: str
    device_type: str
    image: str
    os_version: str


def clean(text: str) -> str:
    """Masked and readable: what every field of a record holds."""
    return redact.text(readable(text))


def markup(text: str) -> str:
    """``text`` for HTML or SVG: clean, then escaped (quotes too: it may be an attribute's)."""
    return escape(clean(text))


def _shown(command: str) -> str:
    return clean(typed(command))


def commands(log: ConsoleLog, start: int, end: int) -> list[CommandRun]:
    """The commands sent in ``[start, end)`` of the console, as masked copies."""
    return [replace(c, command=_shown(c.command), error=clean(c.error))
            for c in list(log.commands) if start <= c.at < end]


def rig_events(log: ConsoleLog, timeline: Sequence[Step], start: int, end: int
               ) -> list[RigEvent]:
    found = [(s.at, RigEvent(s.name, s.part, s.seconds, s.ok,
                             clean(s.note or brief(s.detail))))
             for s in list(timeline) if start <= s.at < end]
    found += [(e.offset, RigEvent(str(e.kind), "console", 0.0, e.kind != EventKind.CONSOLE_LOST,
                                  clean(e.text)))
              for e in log.events_since(start, CONSOLE_EVENTS) if e.offset < end]
    return [event for _, event in sorted(found, key=lambda pair: pair[0])]


def boots(log: ConsoleLog, start: int, end: int) -> list[Boot]:
    """Each boot that began in ``start..end`` (a power-on, a restart, a panic), with the steps its
    console showed up to the next boot, timed from the console's arrival times."""
    origins = [e for e in log.events_since(start, tuple(BOOT_ORIGINS)) if e.offset < end]
    found = []
    for i, origin in enumerate(origins):
        until = origins[i + 1].offset if i + 1 < len(origins) else log.end
        data = log.read(origin.offset, until)
        hits = []
        for name, pattern in BOOT_STEPS:
            m = pattern.search(data)
            when = log.time_at(origin.offset + m.end() - 1) if m else None
            if m and when is not None:
                hits.append((m.start(), name, max(0.0, when - origin.when)))
        steps, before = [], 0.0
        for _, name, at in sorted(hits):
            steps.append(BootStep(name, at, max(0.0, at - before)))
            before = max(before, at)
        if any(s.name in ("firmware", "kernel") for s in steps):  # a board that did start
            found.append(Boot(BOOT_ORIGINS[origin.kind], tuple(steps)))
    return found


def of_span(record: TestRecord, log: ConsoleLog, timeline: Sequence[Step], start: int,
            end: int) -> TestRecord:
    """``record`` with what happened on the rig between two console offsets."""
    record.commands = commands(log, start, end)
    record.events = rig_events(log, timeline, start, end)
    record.boots = boots(log, start, end)
    return record


def command_lines(record: TestRecord) -> str:
    """The commands and rig events as text (allure's attachment)."""
    lines = [f"{c.seconds:8.3f}s  {_exit(c):>6}  {c.transport:<7}  {c.command}"
             for c in record.commands]
    lines += [f"{e.seconds:8.3f}s  {'ok' if e.ok else 'FAILED':>6}  rig      {e.name}"
              + (f": {e.text}" if e.text else "") for e in record.events]
    return "\n".join(lines)


def _exit(c: CommandRun) -> str:
    return str(c.exit_code) if c.exit_code is not None else "-"


def failed(c: CommandRun) -> bool:
    """A command that failed or did not finish; one sent without waiting (``reboot``) did not."""
    return c.exit_code != 0 and c.error != NO_REPLY


def exit_text(c: CommandRun) -> str:
    """A command's exit code, or why there is none."""
    return _exit(c) if c.exit_code is not None or not c.error else f"- ({c.error})"
