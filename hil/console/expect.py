"""pexpect's ``expect`` over the console's capture: ``dut.console``.

The console's reader thread keeps every byte in the ``ConsoleLog``; an expect is only a cursor
into it, searched with pexpect's own searchers (``searcher_re``, ``searcher_string``) by the log's
one matcher (``ConsoleLog.search``). So no byte is taken from the reader: the shell, another
expect object and the test's report each still see all of it.

The stream an expect reads ends where the board does (``EOF``): a power cut, or the kernel
restarting or panicking. With ``EOF`` among the patterns that is a result (its index, as in
pexpect), else a ``ConsoleEOF``. A power-on starts a new stream, as a new spawn does in
pexpect: an expect never reads back across one. A console that stops working is a rig fault
(``InfraError``), never a result.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar, cast

import pexpect
from pexpect import EOF, TIMEOUT
from pexpect.expect import searcher_re, searcher_string

from hil.console.log import ConsoleLog, EventKind, Hit, Searcher, StopEvent
from hil.console.serial import SerialConsole
from hil.errors import DeadlineError, DeviceError

__all__ = ["EOF", "TIMEOUT", "ConsoleEOF", "ConsoleExpect", "ExpectTimeout"]

# Where the board's stream ends: the power went, or its kernel said it restarts or died.
ENDS = (EventKind.POWER_OFF, EventKind.RESET, EventKind.PANIC)

Pattern = str | bytes | re.Pattern[str] | re.Pattern[bytes] | type[EOF] | type[TIMEOUT]
Text = str | bytes | type[EOF] | type[TIMEOUT]
T = TypeVar("T")


class ConsoleEOF(DeviceError, pexpect.EOF):  # type: ignore[misc]  # pexpect is untyped
    """The board's stream ended (power cut, restart, panic) before the pattern came."""


class ExpectTimeout(DeadlineError, pexpect.TIMEOUT):  # type: ignore[misc]
    """No pattern within the deadline: says what was expected and what was seen."""


class ConsoleExpect:
    """``expect`` / ``expect_exact`` / ``send`` / ``sendline`` on one console, pexpect's way:
    ``expect`` returns the index of the pattern that matched first and sets ``before`` (the
    bytes from the cursor to the match), ``after`` (the match's bytes) and ``match``
    (its ``re.Match``, over bytes). ``cursor`` is the console offset the next expect reads
    from; it moves only forward: past a match, past an ``EOF``, to a power-on, or by
    ``skip_to``."""

    def __init__(self, console: SerialConsole, timeout: float = 30.0) -> None:
        """Reads what the console prints from now on."""
        self.console = console
        self.log: ConsoleLog = console.log
        self.timeout = timeout
        self.cursor = self.log.end
        self._events_from = len(self.log.events)  # events before this one are history
        self.before: bytes = b""
        self.after: bytes | type[EOF] | type[TIMEOUT] = b""
        self.match: re.Match[bytes] | bytes | type[EOF] | type[TIMEOUT] | None = None
        self.match_index: int | None = None

    # --- reading --------------------------------------------------------------------------------
    def expect(self, pattern: Pattern | Sequence[Pattern], timeout: float | None = None) -> int:
        """Wait for a regular expression (str or bytes), or the first of a list of them;
        ``EOF`` and ``TIMEOUT`` may be in the list. Returns the index of what matched."""
        patterns: list[Pattern] = _as_list(pattern)
        return self._expect(searcher_re([_compile(p) for p in patterns]), patterns, timeout)

    def expect_exact(self, text: Text | Sequence[Text], timeout: float | None = None) -> int:
        """As ``expect``, for plain strings (no regular expression)."""
        texts: list[Text] = _as_list(text)
        return self._expect(searcher_string([_exact(t) for t in texts]), texts, timeout)

    def skip_to(self, offset: int) -> None:
        """Read on from console ``offset`` (never back): what happened before now (power cuts,
        restarts) is history, not the end of this stream. The ``dut`` fixture does it at each
        test's start, and ``Dut.await_boot`` for each boot it awaits."""
        self.cursor = max(self.cursor, offset)
        self._events_from = len(self.log.events)

    def _expect(self, searcher: Searcher, patterns: Sequence[object],
                timeout: float | None) -> int:
        timeout = self.timeout if timeout is None else timeout
        self._to_last_power_on()
        expected = " or ".join(_describe(p) for p in patterns
                               if p is not EOF and p is not TIMEOUT)
        start = self.cursor
        try:
            with self.log.tally.timing("command"):
                hit = self.log.search(searcher, start, timeout, expected or "the end",
                                      stop_on=ENDS, events_from=self._events_from)
        except StopEvent as exc:
            self.cursor = exc.event.offset
            self._events_from = exc.index + 1
            ended: tuple[type[EOF] | type[TIMEOUT], int, Exception] = (
                EOF, searcher.eof_index, ConsoleEOF(
                    f"board {exc.event.kind} ({exc.event.text or 'by the rig'}) while "
                    f"expecting {expected}", tail=exc.tail))
        except DeadlineError as exc:
            ended = (TIMEOUT, searcher.timeout_index,
                     ExpectTimeout(exc.expected, exc.seen, exc.timeout, tail=exc.tail))
        else:
            return self._matched(hit, start)
        return self._end(*ended, start)  # out of the except: one traceback, ours

    def _matched(self, hit: Hit, start: int) -> int:
        self.before = self.log.read(start, hit.start)
        self.after = hit.data
        self.match = hit.match
        self.match_index = hit.index
        self.cursor = hit.end
        return hit.index

    def _end(self, what: type[EOF] | type[TIMEOUT], index: int, error: Exception,
             start: int) -> int:
        if index < 0:
            raise error
        self.before = self.log.read(start, self.cursor if what is EOF else None)
        self.after = self.match = what
        self.match_index = index
        return index

    def _to_last_power_on(self) -> None:
        """A power-on starts a new stream: jump to the last one since the cursor."""
        events = self.log.events
        for i in range(len(events) - 1, self._events_from - 1, -1):
            if events[i].kind == EventKind.POWER_ON and events[i].offset >= self.cursor:
                self.cursor, self._events_from = events[i].offset, i + 1
                return

    # --- writing --------------------------------------------------------------------------------
    def send(self, text: str | bytes) -> int:
        """Type ``text`` as it is (one write); returns the number of bytes sent."""
        data = _encode(text)
        self.console.write(data)
        return len(data)

    def sendline(self, text: str | bytes = "") -> int:
        """Type ``text`` and Enter."""
        return self.send(_encode(text) + b"\n")


def _as_list(x: T | Sequence[T]) -> list[T]:
    return list(x) if isinstance(x, (list, tuple)) else [x]  # type: ignore[list-item]


def _encode(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _exact(t: Text) -> bytes | type[EOF] | type[TIMEOUT]:
    if t is EOF or t is TIMEOUT or isinstance(t, bytes):
        return t
    if isinstance(t, str):
        return t.encode()
    raise TypeError(f"expect_exact: a text is str, bytes, EOF or TIMEOUT, not "
                    f"{type(t).__name__} ({t!r})")


def _compile(p: Pattern) -> re.Pattern[bytes] | type[EOF] | type[TIMEOUT]:
    """pexpect's patterns, made bytes patterns: the capture is bytes."""
    if p is EOF or p is TIMEOUT:
        return cast("type[EOF]", p)
    if isinstance(p, re.Pattern):
        if isinstance(p.pattern, bytes):
            return p
        return re.compile(p.pattern.encode(), p.flags & ~re.UNICODE)
    if isinstance(p, (str, bytes)):
        return re.compile(_encode(p))
    raise TypeError(f"expect: a pattern is str, bytes, a compiled re, EOF or TIMEOUT, "
                    f"not {type(p).__name__} ({p!r})")


def _describe(p: object) -> str:
    return repr(p.pattern) if isinstance(p, re.Pattern) else repr(p)
