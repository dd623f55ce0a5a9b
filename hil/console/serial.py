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
        self.log = ConsoleLog(ctx.runtime / "console.log")
        self._port: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._expect_eof = False
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
        last: Exception | None = None
        while True:
            try:
                port = serial.serial_for_url(self.url, baudrate=self.baud, timeout=0.2,
                                             rtscts=self.settings.rtscts)
                break
            except (serial.SerialException, OSError, ValueError) as exc:
                last = exc
                if deadline.expired():
                    raise InfraError(f"cannot open console {self.url}: {last}",
                                     part="console", rig=self.ctx.rig) from None
                # the far end (QEMU, ser2net) is starting; its socket has no event to await
                threading.Event().wait(min(0.02, deadline.remaining()))
        with self._lock:
            self._port = port
            self._expect_eof = False
            self.log.mark_alive()
            self._wake.notify_all()
        log.debug("console %s attached", self.url)

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
        port = self._port
        if port is None:
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
                    self.log.mark_lost(f"{self.url}: {exc}")
                    log.warning("console %s lost: %s", self.url, exc)
                continue
            if data:
                self.log.append(data)


