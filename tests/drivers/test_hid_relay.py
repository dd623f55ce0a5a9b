"""The HID relay driver at the hidapi boundary.

This kernel has no uhid (CONFIG_UHID is off), so no virtual HID device can be created; the
fake stands in for ``hid`` (enumerate + Device) only, and models the boards' firmware: a
dcttech board keeps a bit mask that feature reports FF/FD change and feature report 0 reads
back (with the report ID byte first, as hidraw returns it); an LCUS-HID board takes A0 frames
as output reports.
"""

from __future__ import annotations

import os
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from hil.errors import InfraError
from hil.power.hid_relay import HidRelay, HidRelaySettings, dcttech_state
from hil.registry import PartContext


class Board:
    def __init__(self, path: bytes, vid: int, pid: int, serial: str) -> None:
        self.path, self.vid, self.pid, self.serial = path, vid, pid, serial
        self.mask = 0
        self.writes: list[bytes] = []
        self.hang = threading.Event()  # set: the board stops answering (USB wedged)
        self.ignore = False  # set: the firmware ignores switch commands


class FakeHid:
    def __init__(self, boards: list[Board]) -> None:
        self.boards = boards
        self.open_count = 0

    def enumerate(self, vid: int = 0, pid: int = 0) -> list[dict[str, Any]]:
        return [{"path": b.path, "vendor_id": b.vid, "product_id": b.pid,
                 "serial_number": "", "product_string": "USBRelay2"}
                for b in self.boards if (vid, pid) in ((0, 0), (b.vid, b.pid))]

    def module(self) -> types.ModuleType:
        fake = self

        class Device:
            def __init__(self, vid: int | None = None, pid: int | None = None,
                         serial: str | None = None, path: bytes | None = None) -> None:
                found = [b for b in fake.boards if b.path == path]
                if not found:
                    raise OSError(f"unable to open device {path!r}")
                self.board = found[0]
                fake.open_count += 1

            def send_feature_report(self, data: bytes) -> int:
                b = self.board
                if b.hang.is_set():
                    threading.Event().wait(30)
                assert data[0] == 0 and len(data) == 9
                if not b.ignore:
                    if data[1] == 0xFF:
                        b.mask |= 1 << (data[2] - 1)
                    elif data[1] == 0xFD:
                        b.mask &= ~(1 << (data[2] - 1))
                return len(data)

            def get_feature_report(self, report_id: int, size: int) -> bytes:
                data = self.board.serial.encode() + bytes([0, 0, self.board.mask])
                return bytes([report_id]) + data if report_id == 0 else data

            def write(self, data: bytes) -> int:
                self.board.writes.append(bytes(data))
                return len(data)

            def close(self) -> None:
                fake.open_count -= 1

        mod = types.ModuleType("hid")
        mod.enumerate = self.enumerate  # type: ignore[attr-defined]
        mod.Device = Device  # type: ignore[attr-defined]
        return mod


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeHid:
    f = FakeHid([Board(b"/dev/hidraw0", 0x16C0, 0x05DF, "QAAMZ"),
                 Board(b"/dev/hidraw1", 0x16C0, 0x05DF, "BITFT"),
                 Board(b"/dev/hidraw2", 0x5131, 0x2007, "")])
    monkeypatch.setitem(__import__("sys").modules, "hid", f.module())
    return f


def relay(ctx: PartContext, **kw: Any) -> HidRelay:
    return HidRelay(HidRelaySettings.model_validate(kw), ctx)


def test_uhid_is_really_absent() -> None:
    # if this kernel grows uhid, replace the fake with a real virtual device
    assert not Path("/dev/uhid").exists() or os.environ.get("HIL_HAVE_UHID")


def test_report_parsing() -> None:
    assert dcttech_state(b"\x00QAAMZ\x00\x00\x03") == ("QAAMZ", 3)
    assert dcttech_state(b"QAAMZ\x00\x00\x02") == ("QAAMZ", 2)


def test_dcttech_by_serial_with_read_back(fake: FakeHid, ctx: PartContext) -> None:
    r = relay(ctx, serial="BITFT", channel=2)
    r.on()
    assert fake.boards[1].mask == 0b10 and fake.boards[0].mask == 0
    assert r.is_on() is True
    r.off()
    assert fake.boards[1].mask == 0 and r.is_on() is False
    assert fake.open_count == 0  # opened per call, closed again


def test_dcttech_normally_closed(fake: FakeHid, ctx: PartContext) -> None:
    r = relay(ctx, serial="QAAMZ", normally="closed")
    r.on()
    assert fake.boards[0].mask == 0 and r.is_on() is True
    r.off()
    assert fake.boards[0].mask == 1 and r.is_on() is False


def test_unknown_serial(fake: FakeHid, ctx: PartContext) -> None:
    with pytest.raises(InfraError, match=r"no dcttech HID relay with serial 'NOPE'.*QAAMZ"):
        relay(ctx, serial="NOPE").on()


def test_board_ignoring_commands_is_noticed(fake: FakeHid, ctx: PartContext) -> None:
    fake.boards[0].ignore = True
    with pytest.raises(InfraError, match="reads released after it was told to energise"):
        relay(ctx, serial="QAAMZ").on()


def test_board_that_hangs(fake: FakeHid, ctx: PartContext) -> None:
    import time

    fake.boards[0].hang.set()
    t0 = time.monotonic()
    with pytest.raises(InfraError, match=r"no answer within 0\.5s") as err:
        relay(ctx, serial="QAAMZ", timeout=0.5).off()
    assert time.monotonic() - t0 < 1.5
    assert "rig bench1" in str(err.value)


def test_lcus_hid_frames(fake: FakeHid, ctx: PartContext) -> None:
    r = relay(ctx, protocol="lcus", channel=3)
    r.on()
    r.off()
    assert fake.boards[2].writes == [bytes.fromhex("00A00301A4"), bytes.fromhex("00A00300A3")]
    assert r.is_on() is None


def test_ambiguous_without_serial(fake: FakeHid, ctx: PartContext) -> None:
    with pytest.raises(InfraError, match="expected one dcttech HID relay"):
        relay(ctx).on()
