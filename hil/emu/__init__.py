"""Emulated bench hardware: a relay board on a pty, pdudaemon, ser2net in front of a board's
UART, a virtual SD mux, all wired to a QEMU board. The physical drivers are tested against it,
and anyone can try the tool without a board (``hil emu start RIG``).

Kept import-light: ``python -m hil.emu.ctl`` runs for every emulated PDU switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hil.config import RigConfig


@contextlib.contextmanager
def _running(rig: RigConfig, runtime: Path) -> Iterator[None]:
    if not rig.emulator:
        yield
        return
    import logging

    from hil.emu.bench import Bench, running_elsewhere

    other = running_elsewhere(runtime)
    if other is not None:  # a person runs `hil emu start` for this rig: use that one
        logging.getLogger(__name__).info("using the emulated bench of pid %d in %s", other,
                                         runtime)
        yield
        return
    with Bench(rig, runtime):
        yield


def start(rig: RigConfig, runtime: Path) -> contextlib.AbstractContextManager[None]:
    """Start what ``rig.emulator`` describes (nothing if the rig has no ``emulator:``) and stop
    all of it, every child process included, when the context ends. ``runtime`` must be the
    directory the rig's drivers get as ``PartContext.runtime``: relative paths in the rig file
    (the relay's tty, the SD card image) are resolved against it on both sides. If
    ``hil emu start`` already serves this rig in that directory, that one is used."""
    return _running(rig, runtime)
