"""ConsoleLog: every byte the device printed, with timestamps, from power-on.

A background reader appends; waiters block on a condition instead of polling. Boot banners and
kernel panics are recognised as they arrive so a shell can tell "my command is slow" from "the
board rebooted under me".
"""

from __future__ import annotations

import bisect
import contextlib
import re
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pexpect.expect import searcher_re

from hil import redact, steps
from hil.deadline import WaitTally
from hil.errors import DeadlineError, InfraError, brief

# Lines that mean "the board (re)started" or "the kernel died", across bootloaders.
BOOT_MARKERS = re.compile(
    rb"U-Boot 20\d\d|SeaBIOS \(version|Booting Linux on physical CPU|Linux version \d+\.\d+")
PANIC_MARKER = re.compile(rb"Kernel panic - not syncing[^\r\n]*")
# The kernel prints these at emergency level, so they show even with ``quiet``.
RESET_MARKER = re.compile(rb"reboot: (?:Restarting system|Power down|System halted)")
SCAN_OVERLAP = 64  # bytes re-scanned across chunk borders so a marker split in two is found
# a chunk's arrival is kept when it came this long after the last one kept: a boot's steps are
# timed to that, and a long session's index stays small
TIME_RESOLUTION = 0.005
# Terminal control sequences (colours, cursor moves, queries such as ESC[6n, window titles),
# which a systemd boot and line editors print a lot, and the other control characters bar
# newline and tab: noise for a reader of a report, and invalid in XML.
ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])?"
                     r"|[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f]")


def readable(text: str) -> str:
    """Console text for a person (report sections, error tails): without terminal control
    sequences and carriage returns. The capture file keeps the bytes as they came."""
    return ESCAPES.sub("", text)
# bytes before the new ones that a waiter scans again: a match may straddle reads, up to this long
LOOKBACK = 4096


class EventKind(StrEnum):
    """What an entry of the console's timeline records."""

    BOOT = "boot"  # a bootloader or kernel banner: the board (re)started
    RESET = "reset"  # the kernel said it restarts, halts or powers off
    PANIC = "panic"
    POWER_ON = "power-on"  # the rig switched the power (noted just before the switch)
    POWER_OFF = "power-off"
    CONSOLE_LOST = "console-lost"  # the connection dropped (it may come back)
    CONSOLE_BACK = "console-back"  # reopened after a drop
    STEP = "step"  # a rig step began (flash, power, mux)
    TEST = "test"  # a test began


# What a wait on the board stops at by default: the board restarted or died under it.
RESTARTS = (EventKind.BOOT, EventKind.RESET, EventKind.PANIC)


@dataclass(frozen=True)
class Event:
    offset: int
    when: float  # time.time()
    kind: EventKind
    text: str


def typed(command: str) -> str:
    """The command itself: the OS adapter runs each one in a subshell of its own."""
    if command.startswith("(\n") and command.endswith("\n)"):
        return command[2:-2]
    return command


# a CommandRun's ``error`` for a command typed or started without waiting for it (``reboot``)
NO_REPLY = "sent; no reply awaited"


@dataclass
class CommandRun:
    """A command run on the device (over the console's shell or SSH), for the reports. The
    command is kept as typed; the reports mask it (``hil.record``)."""

    transport: str  # "console" or "ssh"
    command: str
    at: int  # console offset when it was sent
    began: float  # time.time()
    seconds: float = 0.0
    exit_code: int | None = None  # None: it did not finish (``error`` says why)
    error: str = ""


class ConsoleLog:
    def __init__(self, path: Path | None = None, max_bytes: int = 64 * 1024 * 1024, *,
                 rig: str = "") -> None:
        self._buf = bytearray()
        self._base = 0  # offset of _buf[0]; the head is dropped past max_bytes
        self._max = max_bytes
        self._cond = threading.Condition()
        self.events: list[Event] = []
        self._file = path.open("wb") if path else None  # one session's console per file
        self._masked = redact.Stream()  # the file gets the bytes as they came, secrets masked
        self.path = path
        self.rig = rig
        self.down: str | None = None  # the connection dropped and is not back (yet)
        self.lost: str | None = None  # it did not come back in time: waiters fail at once
        self.tally = WaitTally()  # time blocked in wait_for (and over SSH, see hil.os)
        self.commands: list[CommandRun] = []  # every command run on the device, in order
        # when each chunk arrived: (offset, time.time()), at TIME_RESOLUTION
        self._chunk_at = array("q")
        self._chunk_when = array("d")

    # --- writer side (the reader thread) ----------------------------------------------------
    def append(self, data: bytes) -> None:
        now = time.time()
        with self._cond:
            start = self.end
            scan_from = max(self._base, start - SCAN_OVERLAP)
            if not self._chunk_when or now - self._chunk_when[-1] >= TIME_RESOLUTION:
                self._chunk_at.append(start)
                self._chunk_when.append(now)
            self._buf += data
            if self._file:
                self._file.write(self._masked.feed(data))
                self._file.flush()
            window = bytes(self._buf[scan_from - self._base:])
            for m in BOOT_MARKERS.finditer(window):
                if scan_from + m.end() > start:  # not already seen in the previous chunk
                    self._event_locked(scan_from + m.start(), now, EventKind.BOOT,
                                       m.group().decode())
            for m in RESET_MARKER.finditer(window):
                if scan_from + m.end() > start:
                    self._event_locked(scan_from + m.start(), now, EventKind.RESET,
                                       m.group().decode())
            for m in PANIC_MARKER.finditer(window):
                if scan_from + m.end() > start:
                    self._event_locked(scan_from + m.start(), now, EventKind.PANIC,
                                       m.group().decode(errors="replace"))
            if len(self._buf) > self._max:
                drop = len(self._buf) - self._max
                del self._buf[:drop]
                self._base += drop
            self._cond.notify_all()

    def note(self, kind: EventKind, text: str = "") -> None:
        """Record a rig event (power on/off, flash, test start) in the timeline."""
        with self._cond:
            self._event_locked(self.end, time.time(), kind, text)
            self._cond.notify_all()

    def mark_down(self, why: str) -> None:
        """The connection dropped; the console is reopening it (``mark_alive``) or gives up
        (``mark_lost``). Waiters go on meanwhile, within their own deadlines."""
        with self._cond:
            self.down = why
            self._event_locked(self.end, time.time(), EventKind.CONSOLE_LOST, why)
            self._cond.notify_all()

    def mark_lost(self, why: str) -> None:
        with self._cond:
            if self.down is None:
                self._event_locked(self.end, time.time(), EventKind.CONSOLE_LOST, why)
            self.down = self.lost = why
            self._cond.notify_all()

    def mark_alive(self) -> None:
        with self._cond:
            if self.down is not None:
                self._event_locked(self.end, time.time(), EventKind.CONSOLE_BACK, self.down)
            self.down = self.lost = None
            self._cond.notify_all()

    def _event_locked(self, offset: int, when: float, kind: EventKind, text: str) -> None:
        self.events.append(Event(offset, when, kind, text))

    @contextlib.contextmanager
    def command(self, transport: str, command: str) -> Iterator[CommandRun]:
        """Record a command run on the device; the caller sets ``exit_code`` once it has it.
        One that raises is recorded with the error's first line."""
        run = CommandRun(transport, command, self.end, time.time())
        t0 = time.monotonic()
        try:
            with steps.span(f"{transport}: {typed(command)}"):
                yield run
        except BaseException as exc:
            run.error = brief(str(exc)) or type(exc).__name__
            raise
        finally:
            run.seconds = time.monotonic() - t0
            with self._cond:
                self.commands.append(run)

    def time_at(self, offset: int) -> float | None:
        """When the byte at ``offset`` arrived (time.time(), to ``TIME_RESOLUTION``); None
        before the first byte."""
        with self._cond:
            i = bisect.bisect_right(self._chunk_at, offset) - 1
            return self._chunk_when[i] if i >= 0 else None

    # --- reader side --------------------------------------------------------------------------
    @property
    def end(self) -> int:
        return self._base + len(self._buf)

    def read(self, start: int, end: int | None = None) -> bytes:
        with self._cond:
            s = max(start, self._base) - self._base
            e = (self.end if end is None else min(end, self.end)) - self._base
            return bytes(self._buf[s:e])

    def wait_beyond(self, offset: int, timeout: float) -> int:
        """The log's end once it is past ``offset``, or after ``timeout`` seconds (an idle
        console); for a reader that follows the stream as it comes (``hil console``)."""
        with self._cond:
            self._cond.wait_for(lambda: self.end > offset, timeout)
            return self.end

    def text(self, start: int = 0, end: int | None = None) -> str:
        return self.read(start, end).decode("utf-8", errors="replace")

    def tail(self, lines: int = 25) -> str:
        data = self.read(max(self._base, self.end - 8192))
        text = readable(data.decode("utf-8", errors="replace"))
        return "\n".join(text.splitlines()[-lines:])

    def events_since(self, offset: int, kinds: tuple[EventKind, ...] = RESTARTS) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.offset >= offset and e.kind in kinds]

    def wait_for(self, pattern: re.Pattern[bytes], start: int, timeout: float, expected: str,
                 *, stop_on: tuple[EventKind, ...] = ()) -> Hit:
        """Block until ``pattern`` appears at or after ``start``. ``stop_on`` event kinds
        (e.g. "panic") end the wait early with the event in the error."""
        with self.tally.timing("command"):
            return self.search(searcher_re([pattern]), start, timeout, expected,
                               stop_on=stop_on)

    def search(self, searcher: Searcher, start: int, timeout: float, expected: str, *,
               stop_on: tuple[EventKind, ...] = (), events_from: int = 0) -> Hit:
        """Block until one of ``searcher``'s patterns (pexpect's ``searcher_re`` or
        ``searcher_string``) appears at or after ``start``: the one matcher of the console.

        Only bytes before the first ``stop_on`` event (from ``events[events_from:]``, at or
        after ``start``) are searched, so whether a match or the event wins does not depend on
        how the bytes were chunked; with no match there, ``StopEvent``. Each wake-up rescans
        only the new bytes plus ``LOOKBACK`` before them (patterns that straddle reads), so a
        long boot log costs nothing per wake-up. Nothing is consumed: every reader sees every
        byte.
        """
        deadline = time.monotonic() + timeout
        pos = start
        with self._cond:
            while True:
                stops = [(i, e) for i, e in enumerate(self.events[events_from:], events_from)
                         if e.offset >= start and e.kind in stop_on]
                limit = stops[0][1].offset if stops else self.end
                s = max(pos, self._base)
                window = bytes(self._buf[s - self._base:max(s, limit) - self._base])
                index = searcher.search(window, len(window), None)
                if index >= 0:
                    match = searcher.match
                    groups = match.groups() if isinstance(match, re.Match) else ()
                    return Hit(s + searcher.start, s + searcher.end, groups,
                               window[searcher.start:searcher.end], index, match)
                if stops:
                    raise StopEvent(stops[0][1], expected, self.tail(), index=stops[0][0])
                pos = max(s, limit - LOOKBACK)
                if self.lost:
                    raise InfraError(f"console lost ({self.lost}) while waiting for {expected}",
                                     part="console", rig=self.rig, tail=self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    drops = [e for e in self.events
                             if e.offset >= start and e.kind == EventKind.CONSOLE_LOST]
                    if drops:  # what the board printed while it was down never reached us
                        raise InfraError(
                            f"gave up waiting for {expected} after {timeout:.1f}s: the console "
                            f"connection dropped during the wait ({drops[-1].text}); what the "
                            "board printed until it was back is lost", part="console",
                            rig=self.rig, tail=self.tail())
                    seen = self.text(max(start, self.end - 200)).replace("\r", "")
                    raise DeadlineError(expected, repr(seen[-200:]) if seen else "no output",
                                        timeout, tail=self.tail())
                self._cond.wait(left)

    def close(self) -> None:
        with self._cond:
            if self._file:
                self._file.write(self._masked.flush())
                self._file.close()
            self._file = None


class StopEvent(Exception):
    """A wait ended early because the board rebooted or panicked (``index``: the event's
    place in ``ConsoleLog.events``)."""

    def __init__(self, event: Event, expected: str, tail: str, *, index: int = -1) -> None:
        super().__init__(f"{event.kind} ({event.text}) while waiting for {expected}")
        self.event, self.tail, self.index = event, tail, index


@dataclass(frozen=True)
class Hit:
    """Where a pattern matched, in absolute console offsets; ``index``: which of the
    searcher's patterns, ``match``: its ``re.Match`` (over a window of the console, not from
    offset 0) or the exact bytes found."""

    start: int
    end: int
    groups: tuple[bytes | None, ...]
    data: bytes
    index: int = 0
    match: re.Match[bytes] | bytes | None = field(default=None, compare=False)


class Searcher(Protocol):
    """pexpect's searchers (``pexpect.expect.searcher_re``, ``searcher_string``): after a
    successful ``search`` (the pattern's index, else -1) ``start``, ``end`` and ``match``
    describe it."""

    start: int
    end: int
    match: Any
    eof_index: int  # where EOF, TIMEOUT are in the patterns given (-1: not there)
    timeout_index: int

    def search(self, buffer: bytes, freshlen: int, searchwindowsize: int | None = None
               ) -> int: ...
