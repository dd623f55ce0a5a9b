"""An LCUS-type USB-serial relay board, emulated on a pty.

It speaks the byte protocol of ``hil.power.serial_relay`` (``A0 ch state sum``; ``FF`` for the
status query) from the device's side, so the driver a bench uses is the one under test. Each
relay has a coil (what the protocol sets) and NO/NC contacts; ``on_contact`` is told when the
contact a board is wired through closes or opens, which is what powers an emulated board.

Fault injection for tests: ``mute`` (the MCU hangs: commands and queries are ignored),
``unplug()``/``plug()`` (the USB cable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from hil.emu.pty import PtyPort

log = logging.getLogger(__name__)

StatusFormat = Literal["none", "text", "bytes"]


class RelayBoard:
    def __init__(self, link: Path, *, channels: int = 1, status: StatusFormat = "text",
                 on_change: Callable[[int, bool], None] | None = None) -> None:
        """``on_change(channel, energised)`` runs in the board's thread on every coil change."""
        self.port = PtyPort(link)
        self.channels = channels
        self.status = status
        self.coils = [False] * (channels + 1)  # index 0 unused: channels count from 1
        self.on_change = on_change
        self.mute = False
        self.frames: list[bytes] = []  # every valid command received, for tests
        self._buf = bytearray()
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def link(self) -> Path:
        return self.port.link

    def start(self) -> RelayBoard:
        self.port.plug()
        self._thread = threading.Thread(target=self._run, name=f"relay {self.link.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.port.unplug()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def unplug(self) -> None:
        with self._lock:
            self.port.unplug()

    def plug(self) -> None:
        with self._lock:
            self.port.plug()

    def contact_closed(self, channel: int, normally: Literal["open", "closed"]) -> bool:
        return self.coils[channel] if normally == "open" else not self.coils[channel]

    # --- the MCU -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            poll = select.poll()
            poll.register(self._stop_r, select.POLLIN)
            with self._lock:
                master = self.port.master if self.port.peer_open() else None
            if master is not None:
                poll.register(master, select.POLLIN)
            # nobody has the tty open: the master reports HUP without end, so look again later
            events = poll.poll(200 if master is not None else 20)
            if any(fd == self._stop_r for fd, _ in events):
                return
            with self._lock:
                data = self.port.read()
            if data and not self.mute:
                self._feed(data)

    def _feed(self, data: bytes) -> None:
        self._buf += data
        while self._buf:
            if self._buf[0] == 0xFF:
                del self._buf[0]
                self._answer_query()
            elif self._buf[0] == 0xA0:
                if len(self._buf) < 4:
                    return
                cmd = bytes(self._buf[:4])
                del self._buf[:4]
                self._command(cmd)
            else:
                del self._buf[0]  # line noise: resynchronise on the next start byte

    def _command(self, cmd: bytes) -> None:
        _, ch, state, csum = cmd
        if csum != sum(cmd[:3]) & 0xFF or not 1 <= ch <= self.channels or state not in (0, 1):
            log.debug("relay: ignoring bad frame %s", cmd.hex())
            return
        self.frames.append(cmd)
        energised = state == 1
        if self.coils[ch] == energised:
            return
        self.coils[ch] = energised
        log.debug("relay: channel %d %s", ch, "energised" if energised else "released")
        if self.on_change is not None:
            try:
                self.on_change(ch, energised)
            except Exception:  # the relay keeps working if what hangs on it fails
                log.exception("relay: load on channel %d failed to switch", ch)

    def _answer_query(self) -> None:
        if self.status == "none":
            return
        coils = self.coils[1:]
        if self.status == "text":
            reply = "".join(f"CH{i}:{'ON' if c else 'OFF'}\r\n" for i, c in enumerate(coils, 1))
            data = reply.encode()
        else:
            data = bytes(int(c) for c in coils)
        with self._lock:
            self.port.write(data)
