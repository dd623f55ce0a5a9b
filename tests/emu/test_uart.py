"""The emulated board's UART bridge: a pty (the USB-serial adapter) ↔ QEMU's serial socket,
here with a socket pair standing in for QEMU."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import serial

from hil.deadline import wait_until
from hil.emu.board import Uart
from hil.emu.pty import PtyPort


def recv_some(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return b""


def test_bridge_both_ways_and_early_input_is_dropped(tmp_path: Path) -> None:
    uart = Uart(PtyPort(tmp_path / "tty"))
    uart.start()
    board, qemu_side = socket.socketpair()
    adapter = serial.Serial(str(tmp_path / "tty"), 115200, timeout=2)
    try:
        uart.attach(qemu_side)
        adapter.write(b"\n")  # typed before the firmware printed anything: lost
        assert recv_some(board, 0.3) == b""
        board.sendall(b"U-Boot 2023.01\r\n")
        assert adapter.read(16) == b"U-Boot 2023.01\r\n"
        adapter.write(b"boot\n")
        assert recv_some(board, 2) == b"boot\n"
        uart.detach()  # power cut: input goes nowhere, the adapter's tty stays
        adapter.write(b"x")
        assert (tmp_path / "tty").is_symlink()
    finally:
        adapter.close()
        board.close()
        uart.stop()
    assert not (tmp_path / "tty").exists()


def test_output_without_a_reader_is_dropped(tmp_path: Path) -> None:
    uart = Uart(PtyPort(tmp_path / "tty"))
    uart.start()
    board, qemu_side = socket.socketpair()
    try:
        uart.attach(qemu_side)
        board.sendall(b"nobody listens\r\n")
        wait_until(lambda: uart._spoke, 2, "the bridge to take the board's output")
        fd = os.open(tmp_path / "tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            board.sendall(b"fresh\r\n")
            got = bytearray()

            def fresh_seen() -> bool:
                got.extend(_read(fd))
                return b"fresh" in got

            wait_until(fresh_seen, 2, "fresh output")
            assert b"nobody" not in got
        finally:
            os.close(fd)
    finally:
        board.close()
        uart.stop()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""
