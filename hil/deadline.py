"""Deadlines: every wait in the framework goes through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from hil.errors import DeadlineError

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
) -> T:
    """Poll ``probe`` until it returns something other than None/False.

    Only for states that have no event to wait on (a socket that starts listening, a file that a
    foreign process creates). ``seen`` describes the last observed state for the error message.
    """
    deadline = Deadline(timeout)
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if deadline.expired():
            raise DeadlineError(expected, seen() if seen else repr(value), timeout,
                                tail=tail() if tail else "")
        time.sleep(min(interval, deadline.remaining()))
