"""USB-serial relay boards with the LCUS byte protocol (LCTech LCUS-1/2/4/8 and clones: a CH340
USB-serial chip and a small MCU).

Each switch command is four bytes, 9600 8N1: ``A0 <channel> <state> <sum>`` with state 01
(coil energised) or 00, and sum = (A0 + channel + state) & FF.

Read-back (``status: query``): the multi-channel boards answer a single ``FF`` byte with the
state of every channel, as text lines ``CH1:ON`` / ``CH2:OFF`` on most firmware, or as one
byte (00/01) per channel on some. Both are understood. The single-relay LCUS-1 has no query:
leave ``status: none``; then ``is_on()`` is None and a board that ignores its commands cannot
be noticed. With ``query``, every switch is read back within the deadline, so a relay that
does not answer is an infrastructure error, not a DUT that "failed to boot".
"""

from __future__ import annotations

import contextlib
import logging
import re
import termios
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hil.deadline import Deadline
from hil.errors import InfraError
from hil.power import NORMALLY_DOC, Normally, coil_for, power_from_coil
from hil.registry import PartContext, Settings

log = logging.getLogger(__name__)

START = 0xA0
QUERY = b"\xff"
_TEXT_STATE = re.compile(rb"CH\s*(\d+)\s*:\s*(ON|OFF)", re.IGNORECASE)


def frame(channel: int, energise: bool) -> bytes:
    state = 1 if energise else 0
    return bytes((START, channel, state, (START + channel + state) & 0xFF))


def parse_status(reply: bytes) -> dict[int, bool]:
    """Channel → coil energised, from either reply format; {} if the reply is neither."""
    text = {int(ch): st.upper() == b"ON" for ch, st in _TEXT_STATE.findall(reply)}
    if text:
        return text
    if reply and all(b in (0, 1) for b in reply):
        return {i + 1: b == 1 for i, b in enumerate(reply)}
    return {}


class SerialRelaySettings(Settings):
    port: str | None = Field(None, description="the board's tty: a stable path "
                             "(/dev/serial/by-id/usb-1a86_...) or a pyserial URL; a relative "
                             "path is in the rig's runtime directory (emulated relay boards)")
    match: dict[str, str] | None = Field(None, description="udev properties or ATTRS{} of the "
                                         "board's USB-serial chip instead of `port` (see "
                                         "`hil discover`)")
    channel: int = Field(1, ge=1, le=8, description="relay number on the board")
    baud: int = Field(9600, gt=0, description="LCUS boards run at 9600 baud")
    normally: Normally = Field("open", description=NORMALLY_DOC)
    status: Literal["none", "query"] = Field(
        "none", description="'query': the board answers FF with its relay states (multi-channel"
        " LCUS boards) and every switch is read back; 'none': it cannot report (LCUS-1)")
    timeout: float = Field(3.0, gt=0, description="seconds for one switch including read-back")

    @model_validator(mode="after")
    def _one_source(self) -> SerialRelaySettings:
        if (self.port is None) == (self.match is None):
            raise ValueError("give exactly one of 'port' or 'match'")
        return self


class SerialRelay:
    Settings = SerialRelaySettings

    def __init__(self, settings: SerialRelaySettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        self._port: Any = None
        self._url = ""  # of the open port, for messages
        self._lock = threading.Lock()

    # --- the port ----------------------------------------------------------------------------
    def url(self) -> str:
        s = self.settings
        if s.port is None:
            from hil.udev import find_node

            assert s.match is not None
            return find_node("tty", s.match, part=self.ctx.part, rig=self.ctx.rig)
        if "://" in s.port or Path(s.port).is_absolute():
            return s.port
        return str(self.ctx.runtime / s.port)

    def _open(self, deadline: Deadline) -> Any:
        if self._port is not None:
            return self._port
        import serial

        url = self._url = self.url()
        try:
            # exclusive: a second session on the same relay must fail, not fight over it
            port = serial.serial_for_url(url, baudrate=self.settings.baud, timeout=0.1,
                                         write_timeout=max(0.1, deadline.remaining()),
                                         exclusive=True)
        except serial.SerialException as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise self.ctx.error(f"relay port {url} is busy (another process holds it): "
                                     f"{text}") from None
            raise self.ctx.error(f"cannot open relay port {url}: {text}") from None
        self._port = port
        return port

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            with contextlib.suppress(Exception):
                port.close()

    def _io(self, deadline: Deadline, data: bytes, *, reply: bool) -> bytes:
        """Send ``data``; with ``reply``, read until the board goes quiet or time runs out."""
        import serial

        port = self._open(deadline)
        try:
            port.reset_input_buffer()
            port.write_timeout = max(0.05, deadline.remaining())
            port.write(data)
            port.flush()
            if not reply:
                return b""
            port.timeout = max(0.01, deadline.remaining())
            got = bytes(port.read(1))
            if got:
                port.timeout = 0.05  # the rest of the reply follows at 9600 baud: ~1 ms/byte
                while chunk := bytes(port.read(256)):
                    got += chunk
            return got
        except (serial.SerialException, OSError, termios.error) as exc:
            self._drop_port()  # unplugged? the next call opens it afresh
            raise self.ctx.error(f"relay port {self._url} failed: {exc}") from None

    # --- switching ---------------------------------------------------------------------------
    def _query(self, deadline: Deadline) -> bool:
        """The coil state of our channel, read from the board."""
        ch = self.settings.channel
        reply = self._io(deadline, QUERY, reply=True)
        states = parse_status(reply)
        if ch in states:
            return states[ch]
        if not reply:
            raise self.ctx.error(f"relay board on {self._url} did not answer the status query "
                                 f"within {deadline.timeout:.1f}s (is it powered, is it the right "
                                 f"port, does it support status: query?)")
        raise self.ctx.error(f"relay board on {self._url} answered the status query with "
                             f"{reply[:64]!r}, which has no state for channel {ch}")

    def _switch(self, power_on: bool) -> None:
        s = self.settings
        deadline = Deadline(s.timeout)
        coil = coil_for(power_on, s.normally)
        with self._lock:
            self._io(deadline, frame(s.channel, coil), reply=False)
            if s.status == "none":
                return
            seen = self._query(deadline)
            if seen != coil:
                raise self.ctx.error(f"relay channel {s.channel} reads "
                                     f"{'energised' if seen else 'released'} after it was told to "
                                     f"{'energise' if coil else 'release'}")
        log.debug("%s: relay %d %s (coil %s)", self.ctx.rig, s.channel,
                  "on" if power_on else "off", coil)

    def on(self) -> None:
        try:
            self._switch(True)
        except InfraError:
            self._leave_off()
            raise

    def off(self) -> None:
        self._switch(False)

    def _leave_off(self) -> None:
        """Best effort after a failure: the rig must not be left powered."""
        s = self.settings
        with self._lock, contextlib.suppress(Exception):
            self._io(Deadline(0.5), frame(s.channel, coil_for(False, s.normally)), reply=False)

    def is_on(self) -> bool | None:
        s = self.settings
        if s.status == "none":
            return None
        with self._lock:
            return power_from_coil(self._query(Deadline(s.timeout)), s.normally)

    def close(self) -> None:
        with self._lock:
            self._drop_port()
