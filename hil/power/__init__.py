"""Power switches for a bench: relays (serial, USB HID, GPIO), PDUs through pdudaemon, any
command, or the person at the bench.

Every driver keeps to ``hil.parts.Power``: ``on``/``off`` return once the switch is known to
have moved (read back where the device can report), ``is_on`` says what the device reports
(None where it cannot), and every call has a deadline. A failed ``on`` tries to leave the
board powered off before it raises, so a broken rig never stays half-powered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal, TypeVar

from hil.errors import InfraError

T = TypeVar("T")

Normally = Literal["open", "closed"]

NORMALLY_DOC = ("which relay contact the board's supply runs through: 'open' (NO: energising "
                "the coil powers the board) or 'closed' (NC: energising the coil cuts power, "
                "so the board runs while the relay is idle)")


def coil_for(power_on: bool, normally: Normally) -> bool:
    """Whether the relay coil must be energised for the board to be powered ``power_on``."""
    return power_on if normally == "open" else not power_on


def power_from_coil(coil: bool, normally: Normally) -> bool:
    return coil if normally == "open" else not coil


def call_with_deadline(fn: Callable[[], T], timeout: float, what: str, *, part: str,
                       rig: str) -> T:
    """Run a blocking library call that has no timeout of its own (hidapi, gpiod and usbsdmux
    ioctls on a wedged USB device) with a deadline. On expiry the call is abandoned in its
    daemon thread: the device is not answering, and the caller gets an InfraError now."""
    result: list[T] = []
    error: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"{part}: {what}", daemon=True).start()
    if not done.wait(timeout):
        raise InfraError(f"{what}: no answer within {timeout:.1f}s", part=part, rig=rig)
    if error:
        raise error[0]
    return result[0]
