"""USB HID relay boards through hidapi (the ``hid`` package; needs libhidapi-hidraw0).

``protocol: dcttech`` — the V-USB boards sold as "USBRelay1/2/4/8" (16c0:05df). Switching is a
feature report ``FF <ch>`` (energise) or ``FD <ch>`` (release); reading feature report 0 gives
8 bytes: the board's 5-character serial, then at byte 7 a bit mask of energised relays. That
serial (not the USB serial string, which these boards leave empty) tells boards apart.

``protocol: lcus`` — LCTech LCUS-HID boards (5131:2007): the LCUS serial frame
``A0 <ch> <state> <sum>`` sent as an output report. They cannot report their state, so
``is_on()`` is None.

The device is opened for each call and closed again, so a board that was re-plugged (new
hidraw node) is found again by its serial.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

from pydantic import Field

from hil.errors import InfraError
from hil.power import NORMALLY_DOC, Normally, call_with_deadline, coil_for, power_from_coil
from hil.registry import PartContext, Settings

log = logging.getLogger(__name__)

IDS = {"dcttech": (0x16C0, 0x05DF), "lcus": (0x5131, 0x2007)}


def dcttech_state(report: bytes) -> tuple[str, int]:
    """(serial, relay bit mask) from feature report 0, with or without the leading report ID
    byte (hidraw returns it for unnumbered reports, other backends do not)."""
    data = report[1:9] if len(report) >= 9 else report[:8]
    if len(data) < 8:
        raise ValueError(f"short feature report {report.hex()}")
    return data[:5].decode("ascii", errors="replace").rstrip("\0"), data[7]


class HidRelaySettings(Settings):
    protocol: Literal["dcttech", "lcus"] = Field(
        "dcttech", description="dcttech: V-USB 'USBRelayN' boards (state read back); lcus: "
        "LCTech LCUS-HID boards (write-only)")
    serial: str | None = Field(None, description="dcttech: the board's 5-character serial "
                               "(shown by `hil discover`); lcus: the USB serial string")
    path: str | None = Field(None, description="hidraw node or hidapi path instead of serial "
                             "(changes when re-plugged: prefer serial)")
    vid: int | None = Field(None, description="USB vendor ID; default by protocol")
    pid: int | None = Field(None, description="USB product ID; default by protocol")
    channel: int = Field(1, ge=1, le=8, description="relay number on the board")
    normally: Normally = Field("open", description=NORMALLY_DOC)
    timeout: float = Field(3.0, gt=0, description="seconds for one switch including read-back")


class HidRelay:
    Settings = HidRelaySettings

    def __init__(self, settings: HidRelaySettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        default_vid, default_pid = IDS[settings.protocol]
        self.vid = settings.vid if settings.vid is not None else default_vid
        self.pid = settings.pid if settings.pid is not None else default_pid

    def _hid(self) -> Any:
        try:
            import hid
        except ImportError as exc:  # the library loads libhidapi at import
            raise self.ctx.error(f"the hid library is not usable: {exc} (pip install hid; apt "
                                 f"package libhidapi-hidraw0)") from None
        return hid

    def _open(self) -> Any:
        """Open the board (runs inside the deadline)."""
        hid = self._hid()
        s = self.settings
        if s.path:
            return hid.Device(path=s.path.encode())
        found = hid.enumerate(self.vid, self.pid)
        if s.protocol == "lcus" or s.serial is None:
            if s.serial is not None:
                found = [d for d in found if d.get("serial_number") == s.serial]
            if len(found) != 1:
                with_serial = f" with serial {s.serial}" if s.serial else ""
                raise self.ctx.error(f"expected one {s.protocol} HID relay {self.vid:04x}:"
                                     f"{self.pid:04x}{with_serial}, found {len(found)}")
            return hid.Device(path=found[0]["path"])
        seen = []
        for info in found:
            dev = hid.Device(path=info["path"])
            try:
                serial, _ = dcttech_state(dev.get_feature_report(0, 9))
            except Exception:
                dev.close()
                continue
            if serial == s.serial:
                return dev
            seen.append(serial)
            dev.close()
        raise self.ctx.error(f"no dcttech HID relay with serial {s.serial!r}; boards present: "
                             f"{', '.join(seen) or 'none'}")

    def _call(self, what: str, op: Any, timeout: float | None = None) -> Any:
        def run() -> Any:
            dev = self._open()
            try:
                return op(dev)
            finally:
                with contextlib.suppress(Exception):
                    dev.close()

        try:
            return call_with_deadline(run, timeout or self.settings.timeout, f"HID relay {what}",
                                      part=self.ctx.part, rig=self.ctx.rig)
        except InfraError:
            raise
        except Exception as exc:  # hid.HIDException and OSError from the library
            raise self.ctx.error(f"HID relay {what} failed: {exc}") from None

    def _coil(self, dev: Any) -> bool:
        _, mask = dcttech_state(dev.get_feature_report(0, 9))
        return bool(mask & (1 << (self.settings.channel - 1)))

    def _switch(self, power_on: bool, timeout: float | None = None) -> None:
        s = self.settings
        coil = coil_for(power_on, s.normally)

        def op(dev: Any) -> bool | None:
            if s.protocol == "dcttech":
                dev.send_feature_report(bytes([0, 0xFF if coil else 0xFD, s.channel])
                                        + bytes(6))
                return self._coil(dev)
            state = 1 if coil else 0
            dev.write(bytes([0, 0xA0, s.channel, state, (0xA0 + s.channel + state) & 0xFF]))
            return None

        seen = self._call("switch", op, timeout)
        if seen is not None and seen != coil:
            raise self.ctx.error(f"HID relay channel {s.channel} reads "
                                 f"{'energised' if seen else 'released'} after it was told to "
                                 f"{'energise' if coil else 'release'}")

    def on(self) -> None:
        try:
            self._switch(True)
        except InfraError:
            with contextlib.suppress(InfraError):
                self._switch(False, timeout=1.0)  # leave the rig powered off
            raise

    def off(self) -> None:
        self._switch(False)

    def is_on(self) -> bool | None:
        if self.settings.protocol != "dcttech":
            return None
        return power_from_coil(bool(self._call("read", self._coil)), self.settings.normally)

    def close(self) -> None:
        pass
