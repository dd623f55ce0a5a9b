"""The error kinds the framework raises.

A test failure (the device broke a promise) is an ``AssertionError``: a plain ``assert`` in a
test, or ``OSContractError`` from the framework. A rig fault is an ``InfraError`` and the report
shows it apart, so a reader can tell "the OS is wrong" from "the rig is wrong".
"""

from __future__ import annotations

from pathlib import Path


class HilError(Exception):
    """Base of all framework errors."""


class ConfigError(HilError):
    """A rig, device-type or image description is malformed. Names file, line and key."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        where = ""
        if file:
            where = file + (f":{line}" if line else "")
            if key:
                where += f": {key}"
            where += ": "
        elif key:
            where = f"{key}: "
        super().__init__(where + message)
        self.file, self.line, self.key = file, line, key


TAIL_HEADER = "\n--- console tail ---\n"


def with_tail(text: str, tail: str) -> str:
    """``text`` followed by what the console showed last, in the one format every error uses."""
    return f"{text}{TAIL_HEADER}{tail}" if tail else text


def log_tail(path: Path, lines: int = 15) -> str:
    """The end of a helper's log (QEMU's, nbdkit's, a daemon's), for the error that says why it
    stopped."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


def brief(text: str, width: int = 200) -> str:
    """One line for an error's text (made by ``with_tail``), for lists that must stay short:
    its first line, cut to ``width``, and the console's last line, the one that stopped it.
    The full text is shown once, in the test's report."""
    head, _, tail = text.partition(TAIL_HEADER)
    lines = head.strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > width:
        first = first[:width - 1] + "…"
    last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
    return f"{first} (console's last line: {last[:80]!r})" if last else first


class InfraError(HilError):
    """The rig failed (power, mux, console, flash, QEMU): not the device under test's fault."""

    def __init__(self, message: str, *, part: str = "", rig: str = "", tail: str = "") -> None:
        head = " ".join(x for x in (f"rig {rig}" if rig else "", part) if x)
        super().__init__(with_tail(f"[{head}] {message}" if head else message, tail))
        self.message, self.part, self.rig, self.tail = message, part, rig, tail


class DeadlineError(HilError):
    """A wait ran out of time. Says what was expected and what was seen."""

    def __init__(self, expected: str, seen: str, timeout: float, *, tail: str = "") -> None:
        super().__init__(with_tail(f"timed out after {timeout:.1f}s waiting for {expected}; "
                                   f"saw: {seen}", tail))
        self.expected, self.seen, self.timeout, self.tail = expected, seen, timeout, tail


class DeviceError(HilError):
    """The device did something that makes the current test meaningless (panic, unexpected
    reboot, lost shell). Not a rig fault, and not an assertion about the OS either."""

    def __init__(self, message: str, *, tail: str = "") -> None:
        super().__init__(with_tail(message, tail))
        self.tail = tail


class OSContractError(AssertionError):
    """The device broke a promise of its OS's contract (a file or link it must have is not
    there, a state it must reach does not come): a test failure, not a framework error."""


class NotReached(OSContractError):
    """A state the device promised did not come within its deadline (``Dut.poll``): says what
    was expected and what was seen last."""

    def __init__(self, expected: str, seen: str, timeout: float, *, tail: str = "") -> None:
        super().__init__(with_tail(f"{expected}: not so after {timeout:.0f}s; last seen:\n"
                                   f"{seen}", tail))
        self.expected, self.seen, self.timeout, self.tail = expected, seen, timeout, tail
