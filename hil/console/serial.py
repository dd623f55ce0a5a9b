"""Serial console transport: any pyserial URL (``/dev/ttyUSB0``, ``rfc2217://host:port``,
``socket://``, ``unix:///path``) or a local adapter found by udev properties.

A reader thread copies every byte into a ``ConsoleLog`` from the moment the port opens, so the
boot log is never lost to a late ``expect``.
"""

from __future__ import annotations

import fcntl
import logging
import sys
import termios
import threading
import time
from typing import Any

import serial
from pydantic import Field, model_validator

import hil.console  # noqa: F401  (registers unix://)
from hil.console.log import ConsoleLog
from hil.deadline import Deadline
from hil.errors import InfraError
from hil.registry import PartContext, Settings

log = logging.getLogger(__name__)


class SerialSettings(Settings):
    url: str | None = Field(None, description="device path or pyserial URL "
                            "(rfc2217://host:port?ign_set_control, socket://, unix:///path)")
    match: dict[str, str] | None = Field(
        None, description="udev properties of the adapter (e.g. ID_SERIAL_SHORT), so the rig "
        "file survives re-plugging; see `hil discover`")
    baud: int | None = Field(None, gt=0, description="default: the device type's console speed")
    rtscts: bool = Field(False, description="hardware flow control (RTS/CTS)")
    reconnect: float = Field(
        5.0, ge=0, le=600, description="seconds to keep reopening a console whose connection "
        "dropped (ser2net restarted, an adapter re-plugged) before the session reports it lost "
        "(an INFRA error naming the console); what the board printed meanwhile is lost")

    @model_validator(mode="after")
    def _one_source(self) -> SerialSettings:
        if (self.url is None) == (self.match is None):
            raise ValueError("give exactly one of 'url' or 'match'")
        return self


def _available(port: Any) -> int:
    """Bytes ready to read. pyserial's socket handlers report only "readable" (1), which would
    make the reader take one byte per call; the kernel knows the real count."""
    sock = getattr(port, "_socket", None)
    if sock is not None:
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            return max(1, int.from_bytes(buf, sys.byteorder))
        except OSError:
            return 1
    return int(port.in_waiting)


class SerialConsole:
    Settings = SerialSettings

    def __init__(self, settings: SerialSettings, ctx: PartContext, *,
                 url: str | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self._url = url or settings.url
        self.baud = settings.baud or (ctx.device_type.console.baud if ctx.device_type else 115200)
        self.log = ConsoleLog(ctx.runtime / "console.log", rig=ctx.rig)
        self._port: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._expect_eof = False
        self._outage: Deadline | None = None  # the reopening's deadline, while one runs
        self._back_at = 0.0  # monotonic time the console was last reopened after a drop
        self._thread = threading.Thread(target=self._reader, name=f"console-{ctx.rig}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        if self._url is None:
            from hil.udev import find_node

            assert self.settings.match is not None
            self._url = find_node("tty", self.settings.match, part="console", rig=self.ctx.rig)
        return self._url

    # --- lifecycle ----------------------------------------------------------------------------
    def attach(self, timeout: float = 10.0) -> None:
        """Open the port (again), retrying until ``timeout`` while the far end comes up."""
        deadline = Deadline(timeout)
        while True:
            try:
                port = self._open()
                break
            except (serial.SerialException, OSError, ValueError) as exc:
                if deadline.expired():
                    raise InfraError(f"cannot open console {self.url}: {exc}",
                                     part="console", rig=self.ctx.rig) from None
                # the far end (QEMU, ser2net) is starting; its socket has no event to await
                threading.Event().wait(min(0.02, deadline.remaining()))
        with self._lock:
            self._port = port
            self._expect_eof = False
            self._outage = None
            self.log.mark_alive()
            self._wake.notify_all()
        log.debug("console %s attached", self.url)

    def _open(self) -> Any:
        return serial.serial_for_url(self.url, baudrate=self.baud, timeout=0.2,
                                     rtscts=self.settings.rtscts)

    def _reopen(self, why: str) -> None:
        """The connection dropped under us (ser2net restarted, an adapter re-plugged): reopen
        it, as a lab wants, within ``reconnect`` seconds; else the console is lost and every
        waiter fails at once. A connection that drops again within a second of coming back
        (ser2net accepts, then cannot open its tty) stays the same outage."""
        now = time.monotonic()
        if self._outage is None or now - self._back_at > 1.0:
            self._outage = Deadline(self.settings.reconnect)
        outage = self._outage
        self.log.mark_down(why)
        log.warning("console %s dropped (%s): reopening for %.0fs", self.url, why,
                    outage.remaining())
        while True:
            with self._lock:
                if self._closing or self._expect_eof or self._port is not None:
                    return  # closed, detached on purpose, or attached again by attach()
            try:
                port = self._open()
            except (serial.SerialException, OSError, ValueError) as exc:
                if outage.expired():
                    self.log.mark_lost(f"{why}; not back within "
                                       f"{self.settings.reconnect:.0f}s ({exc})")
                    with self._lock:
                        self._wake.notify_all()  # writers waiting for the console
                    return
                with self._lock:  # close() wakes us; the far end has no event to await
                    self._wake.wait(min(0.1, outage.remaining()))
                continue
            with self._lock:
                if self._closing or self._expect_eof or self._port is not None:
                    port.close()
                    return
                self._port = port
                self._back_at = time.monotonic()
                self.log.mark_alive()
                self._wake.notify_all()
            log.warning("console %s back after %.1fs", self.url, time.monotonic() - now)
            return

    def detach(self) -> None:
        """Close the port on purpose (power cut of a QEMU board): EOF is not a fault."""
        with self._lock:
            self._expect_eof = True
            port, self._port = self._port, None
        if port is not None:
            port.close()

    def open(self) -> None:
        self.attach()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self.detach()
        self._thread.join(timeout=2)
        self.log.close()

    @property
    def attached(self) -> bool:
        return self._port is not None

    def write(self, data: bytes) -> None:
        with self._lock:  # a console being reopened takes the write once it is back
            while self._port is None and self.log.down and not self.log.lost and \
                    not self._closing and not self._expect_eof:
                self._wake.wait(1.0)
            port = self._port
        if port is None:
            if self.log.lost:
                raise InfraError(f"console lost ({self.log.lost})", part="console",
                                 rig=self.ctx.rig, tail=self.log.tail())
            raise InfraError("console is not attached (board powered off?)", part="console",
                             rig=self.ctx.rig, tail=self.log.tail())
        try:
            port.write(data)
        except (serial.SerialException, OSError) as exc:
            raise InfraError(f"console write failed: {exc}", part="console", rig=self.ctx.rig,
                             tail=self.log.tail()) from None

    # --- the reader thread ----------------------------------------------------------------------
    def _reader(self) -> None:
        while True:
            with self._lock:
                while self._port is None and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                port = self._port
            try:
                data = port.read(max(1, min(_available(port), 65536)))
            except (serial.SerialException, OSError, TypeError, AttributeError,
                    ValueError) as exc:
                # TypeError/AttributeError/ValueError (select on fd -1): pyserial internals
                # after close() from another thread
                with self._lock:
                    expected = self._expect_eof or self._port is not port
                    if self._port is port:
                        self._port = None
                if not expected:
                    self._reopen(f"{self.url}: {exc}")
                continue
            if data:
                self.log.append(data)


