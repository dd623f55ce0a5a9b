"""The serial relay driver against the relay board emulator: real bytes over a real pty."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.emu.relay import RelayBoard
from hil.errors import InfraError
from hil.power.serial_relay import SerialRelay, SerialRelaySettings, frame, parse_status
from hil.registry import PartContext


class RecordingBoard(RelayBoard):
    def __init__(self, link: Path) -> None:
        self.events: list[tuple[int, bool]] = []
        super().__init__(link, channels=4, status="text",
                         on_change=lambda ch, on: self.events.append((ch, on)))


@pytest.fixture
def board(tmp_path: Path) -> Iterator[RecordingBoard]:
    b = RecordingBoard(tmp_path / "relay-tty")
    b.start()
    yield b
    b.stop()


def relay(ctx: PartContext, **kw: object) -> SerialRelay:
    settings = SerialRelaySettings.model_validate({"port": "relay-tty", **kw})
    return SerialRelay(settings, ctx)


def test_frames_and_status_formats() -> None:
    assert frame(1, True) == bytes.fromhex("A00101A2")
    assert frame(1, False) == bytes.fromhex("A00100A1")
    assert parse_status(b"CH1:OFF\r\nCH2:ON\r\n") == {1: False, 2: True}
    assert parse_status(b"\x00\x01") == {1: False, 2: True}
    assert parse_status(b"garbage") == {}


def test_on_off_read_back(board: RecordingBoard, ctx: PartContext) -> None:
    r = relay(ctx, channel=2, status="query")
    try:
        r.on()
        assert board.coils[2] is True and r.is_on() is True
        r.off()
        assert board.coils[2] is False and r.is_on() is False
        assert board.events == [(2, True), (2, False)]
    finally:
        r.close()


def test_normally_closed_wiring_inverts_the_coil(board: RelayBoard, ctx: PartContext) -> None:
    r = relay(ctx, channel=1, status="query", normally="closed")
    try:
        r.on()
        assert board.coils[1] is False and board.contact_closed(1, "closed")
        assert r.is_on() is True
        r.off()
        assert board.coils[1] is True and r.is_on() is False
    finally:
        r.close()


def test_byte_status_format(tmp_path: Path, ctx: PartContext) -> None:
    b = RelayBoard(tmp_path / "relay-tty", channels=2, status="bytes").start()
    r = relay(ctx, channel=2, status="query")
    try:
        r.on()
        assert r.is_on() is True
    finally:
        r.close()
        b.stop()


def test_board_without_status_cannot_report(tmp_path: Path, ctx: PartContext) -> None:
    b = RelayBoard(tmp_path / "relay-tty", channels=1, status="none").start()
    r = relay(ctx)
    try:
        r.on()
        # nothing to read back: the frame is on the wire, the MCU acts on it shortly after
        wait_until(lambda: b.coils[1], 2, "the emulated relay to energise")
        assert r.is_on() is None
    finally:
        r.close()
        b.stop()


def test_relay_that_does_not_answer(board: RelayBoard, ctx: PartContext) -> None:
    r = relay(ctx, status="query", timeout=0.5)
    board.mute = True
    t0 = time.monotonic()
    with pytest.raises(InfraError) as err:
        r.on()
    took = time.monotonic() - t0
    assert took < 1.5, took
    text = str(err.value)
    assert "rig bench1" in text and "power" in text and "did not answer" in text
    board.mute = False
    r.close()


def test_wrong_channel_state_is_reported(board: RelayBoard, ctx: PartContext) -> None:
    r = relay(ctx, channel=4, status="query", timeout=0.5)
    board.channels = 3  # the board ignores channel 4 but still reports CH1..CH3 + CH4:OFF
    with pytest.raises(InfraError, match="reads released"):
        r.on()
    r.close()


def test_port_that_vanishes(board: RelayBoard, ctx: PartContext) -> None:
    r = relay(ctx, status="query", timeout=1)
    r.on()
    board.unplug()
    t0 = time.monotonic()
    with pytest.raises(InfraError, match="relay port") as err:
        r.off()
    assert time.monotonic() - t0 < 2
    assert "rig bench1" in str(err.value)
    # re-plugged: the driver opens the port afresh
    board.plug()
    r.off()
    assert board.coils[1] is False
    r.close()


def test_missing_port(ctx: PartContext) -> None:
    r = relay(ctx, port="/dev/serial/by-id/no-such-relay", timeout=0.5)
    with pytest.raises(InfraError, match="cannot open relay port"):
        r.on()


def test_busy_port(board: RelayBoard, ctx: PartContext) -> None:
    first, second = relay(ctx), relay(ctx, timeout=0.5)
    first.on()
    try:
        with pytest.raises(InfraError, match="busy"):
            second.off()
    finally:
        first.close()
        second.close()


def test_settings_need_one_source() -> None:
    with pytest.raises(ValueError):
        SerialRelaySettings.model_validate({})
    with pytest.raises(ValueError):
        SerialRelaySettings.model_validate({"port": "x", "match": {"A": "b"}})
