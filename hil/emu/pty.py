"""A pty standing in for a USB-serial adapter.

The emulator holds the master side (the far end of the cable: a relay board's MCU, a board's
UART). The slave side is the ``/dev/ttyUSBx`` a driver opens, reached through a stable symlink
as ``/dev/serial/by-id/...`` would be. Unplugging removes the link and closes the master: the
driver sees the same I/O errors a yanked USB cable gives.

Bytes written while nobody has the tty open are dropped, as an adapter whose port is closed
drops them (a pty would keep them and hand stale output to the next reader).
"""

from __future__ import annotations

import contextlib
import os
import select
import tty
from pathlib import Path


class PtyPort:
    def __init__(self, link: Path) -> None:
        self.link = link
        self.master: int | None = None
        self.slave_name = ""

    def plug(self) -> None:
        """Create the tty and its symlink (the adapter is plugged in)."""
        if self.master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # a UART passes bytes as they are: no echo, no line discipline
        self.slave_name = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self.link.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.slave_name)
        tmp.replace(self.link)  # atomic: a reader never sees a missing link during a re-plug

    def unplug(self) -> None:
        """Remove the tty: open file handles on it get EIO, the link is gone."""
        with contextlib.suppress(FileNotFoundError):
            if self.link.is_symlink() and os.readlink(self.link) == self.slave_name:
                self.link.unlink()
        master, self.master = self.master, None
        if master is not None:
            os.close(master)

    @property
    def plugged(self) -> bool:
        return self.master is not None

    def peer_open(self) -> bool:
        """Whether a driver has the tty open (the master reports HUP while nobody does)."""
        if self.master is None:
            return False
        p = select.poll()
        p.register(self.master, select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in p.poll(0))

    def read(self) -> bytes:
        """What the driver sent; b"" if nothing (or nobody has the port open)."""
        if self.master is None:
            return b""
        try:
            return os.read(self.master, 65536)
        except (BlockingIOError, OSError):  # EIO: no one has the slave open
            return b""

    def write(self, data: bytes) -> int:
        """Send to the driver; dropped when nobody has the port open. Returns bytes taken."""
        if self.master is None or not self.peer_open():
            return len(data)
        try:
            return os.write(self.master, data)
        except BlockingIOError:
            return 0
        except OSError:
            return len(data)
