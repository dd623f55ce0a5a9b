"""The error kinds the framework raises.

A test failure (the device broke a promise) is an ordinary ``AssertionError``. Everything else
is one of these, so the report can tell "the OS is wrong" from "the rig is wrong".
"""

from __future__ import annotations


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


class InfraError(HilError):
    """The rig failed (power, mux, console, flash, QEMU): not the device under test's fault."""

    def __init__(self, message: str, *, part: str = "", rig: str = "", tail: str = "") -> None:
        head = " ".join(x for x in (f"rig {rig}" if rig else "", part) if x)
        text = f"[{head}] {message}" if head else message
        if tail:
            text += "\n--- console tail ---\n" + tail
        super().__init__(text)
        self.part, self.rig, self.tail = part, rig, tail


class DeadlineError(HilError):
    """A wait ran out of time. Says what was expected and what was seen."""

    def __init__(self, expected: str, seen: str, timeout: float, *, tail: str = "") -> None:
        text = f"timed out after {timeout:.1f}s waiting for {expected}; saw: {seen}"
        if tail:
            text += "\n--- console tail ---\n" + tail
        super().__init__(text)
        self.expected, self.seen, self.timeout, self.tail = expected, seen, timeout, tail


class DeviceError(HilError):
    """The device did something that makes the current test meaningless (panic, unexpected
    reboot, lost shell). Not a rig fault, and not an assertion about the OS either."""
