"""Deadlines: every wait in the framework goes through here."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from hil.errors import DeadlineError, InfraError

T = TypeVar("T")


class Deadline:
    """A point in monotonic time. ``remaining()`` never goes below zero."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    expected: str,
    *,
    seen: Callable[[], str] | None = None,
    interval: float = 0.05,
    tail: Callable[[], str] | None = None,
    part: str | None = None,
    rig: str = "",
) -> T:
    """Poll ``probe`` until it returns something other than None/False, looking every
    ``interval`` seconds (from the start of one look to the next: a probe of the device takes
    time itself). The framework's one poller; ``Dut.poll`` is it for states of the device.

    Only for states that have no event to wait on (a socket that starts listening, a file that a
    foreign process creates). ``seen`` describes the last observed state for the error message.
    A wait on a part of the rig (``part``: a daemon, the emulator) that runs out is a rig fault:
    ``InfraError`` naming the part and ``rig``; any other, ``DeadlineError``.
    """
    deadline = Deadline(timeout)
    while True:
        began = time.monotonic()
        value = probe()
        if value is not None and value is not False:
            return value
        if deadline.expired():
            error = DeadlineError(expected, seen() if seen else repr(value), timeout,
                                  tail=tail() if tail else "")
            if part is not None:
                raise InfraError(str(error), part=part, rig=rig) from None
            raise error
        time.sleep(min(max(0.0, interval - (time.monotonic() - began)), deadline.remaining()))


class WaitTally:
    """Seconds the framework spent blocked on the device, by kind ("boot", "command", "ssh").
    The session report splits its wall time with it: the device's share and the framework's.
    Nested timings count once, under the outermost kind (a boot's waits for single lines are
    boot time, not command time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth = threading.local()

    @contextlib.contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                self.seconds[kind] = self.seconds.get(kind, 0.0) + time.monotonic() - t0
