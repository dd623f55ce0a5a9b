"""A QEMU machine wired like a board on a bench: power from relay contacts or PDU outlets, its
UART behind a USB-serial adapter (a pty that stays when the board is off), its boot medium in
an SD mux.

Power on starts QEMU (the command line is ``hil.qemu.target.QemuTarget``'s); power off kills
it, a real power cut. A guest that powers itself off leaves QEMU gone while the supply is still
on, as a halted board stays dark until its power is cycled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from pathlib import Path
from typing import Any

from hil.deadline import wait_until
from hil.emu.procs import Daemon
from hil.emu.pty import PtyPort
from hil.errors import ConfigError, InfraError
from hil.mux.virtual import read_position
from hil.qemu.target import QemuSettings, QemuTarget
from hil.registry import PartContext

log = logging.getLogger(__name__)

MAX_BACKLOG = 1 << 20  # bytes of board output kept while the adapter's reader lags


class Uart:
    """Copies bytes between QEMU's serial socket and the adapter pty, in both directions.

    Output while nobody has the tty open is dropped, and so is input while the board is off
    or its firmware has not yet brought the UART up (taken here as: until the board's first
    output byte). That is what a UART and a USB-serial adapter do; QEMU would instead queue
    such bytes in the emulated UART, where a stray Enter typed before power-on stops U-Boot's
    autoboot.
    """

    def __init__(self, port: PtyPort) -> None:
        self.port = port
        self._sock: socket.socket | None = None
        self._spoke = False  # the board has printed since power-on: its UART is up
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="uart", daemon=True)

    def start(self) -> None:
        self.port.plug()
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self.detach()
        self.port.unplug()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with self._lock:
            self._sock = sock
            self._spoke = False
        os.write(self._wake_w, b"x")

    def detach(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        backlog = bytearray()
        while not self._stop:
            with self._lock:
                sock = self._sock
                master = self.port.master if self.port.peer_open() else None
            if master is None:
                backlog.clear()  # the adapter's port closed: what was in flight is lost
            poll = select.poll()
            poll.register(self._wake_r, select.POLLIN)
            if sock is not None:
                poll.register(sock, select.POLLIN)
            if master is not None:
                poll.register(master, select.POLLIN | (select.POLLOUT if backlog else 0))
            # With no reader the pty master reports HUP continuously: look again shortly.
            for fd, ev in poll.poll(500 if master is not None else 20):
                if fd == self._wake_r:
                    os.read(self._wake_r, 64)
                elif sock is not None and fd == sock.fileno():
                    self._from_board(sock, backlog)
                elif master is not None and fd == master:
                    if ev & select.POLLIN:
                        self._to_board(sock)
                    if ev & select.POLLOUT and backlog:
                        with contextlib.suppress(BlockingIOError):
                            n = self.port.write(bytes(backlog[:65536]))
                            del backlog[:n]

    def _from_board(self, sock: socket.socket, backlog: bytearray) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # QEMU went away (power cut, or the guest powered off)
            with self._lock:
                if self._sock is sock:
                    self._sock = None
            sock.close()
            return
        self._spoke = True
        if self.port.peer_open():  # now, not at the top of the loop: a reader may just have come
            backlog += data
            if len(backlog) > MAX_BACKLOG:
                del backlog[:len(backlog) - MAX_BACKLOG]

    def _to_board(self, sock: socket.socket | None) -> None:
        data = self.port.read()
        if not data:
            return
        if sock is None or not self._spoke:
            log.debug("uart: dropped %r (board %s)", data[:80], "off" if sock is None
                      else "not up yet")
            return
        log.debug("uart → board: %r", data[:80])
        with contextlib.suppress(OSError):
            sock.sendall(data)  # small (typed commands); a full socket buffer is rare


def _blank(image: Path, size: int) -> None:
    """A blank (sparse) disk where none is yet."""
    if not image.exists():
        image.parent.mkdir(parents=True, exist_ok=True)
        with image.open("wb") as f:
            f.truncate(size)


class EmulatedBoard:
    def __init__(self, qemu: QemuSettings, *, rig: str, runtime: Path, device_type: Any,
                 uart_link: Path, card: tuple[Path, Path] | None = None,
                 card_size: int = 2 * 1024**3, ssh_port: int | None = None,
                 internal: tuple[Path, int] | None = None) -> None:
        """``card``: (image, mux position file) of a virtual SD mux; the board gets the image
        as its disk only while the mux is in position "dut". ``internal``: (image, size) of a
        disk the board always has (eMMC, SSD), after the card in boot order."""
        self.rig, self.runtime = rig, runtime
        self.card, self.card_size = card, card_size
        self.internal = internal
        board_dir = runtime / "board"
        board_dir.mkdir(parents=True, exist_ok=True)
        if "write_cache" in qemu.model_fields_set and qemu.write_cache != "host":
            raise ConfigError(f"rig {rig}: the emulated bench's board keeps its disks in the "
                              "host's page cache (board.write_cache: host)")
        # the card and the internal disk are plain files the mux and the flasher reach directly
        qemu = qemu.model_copy(update={"write_cache": "host"})
        if card is not None:
            qemu = qemu.model_copy(update={"disk": card[0]})
        self.target = QemuTarget(qemu, PartContext(rig, "emulator", board_dir, device_type))
        self.target.console.close()  # the UART bridge connects to QEMU's serial socket instead
        if ssh_port is not None:
            self.target.ssh_port = ssh_port
        self.uart = Uart(PtyPort(uart_link))
        self.inputs: dict[str, bool] = {}
        self.supplied = False  # the board has power (QEMU may still have exited: halted)
        self.qemu: Daemon | None = None
        self.power_ons = 0
        self._lock = threading.Lock()

    # --- wiring ----------------------------------------------------------------------------------
    def start(self) -> EmulatedBoard:
        self.uart.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._cut()
            self.supplied = False
        self.uart.stop()

    def set_input(self, name: str, on: bool) -> None:
        """A supply in the board's power path changed (relay contact, PDU outlet). The board
        is powered while every supply in its path is on."""
        with self._lock:
            self.inputs[name] = on
            if self.powered and not self.supplied:
                try:
                    self._power_on()
                except BaseException:
                    self._cut()
                    raise
                self.supplied = True
            elif self.supplied and not self.powered:
                self._cut()
                self.supplied = False

    @property
    def powered(self) -> bool:
        return bool(self.inputs) and all(self.inputs.values())

    @property
    def running(self) -> bool:
        return self.qemu is not None and self.qemu.running

    # --- power ---------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        cmd = self.target.command()
        if self.internal is not None:
            # PCI slots follow the command line: the card (when in) is the first disk the
            # firmware tries and the kernel's vda, the internal disk the next
            image, size = self.internal
            _blank(image, size)
            cmd += ["-drive", f"file={image},format=raw,if=none,id=internal,cache=unsafe",
                    "-device", "virtio-blk-pci,drive=internal"]
        if self.card is None:
            self.target.storage.target(0)  # the board's own disk
            return cmd
        image, position_file = self.card
        _blank(image, self.card_size)
        if read_position(position_file) == "dut":
            return cmd
        # the card is on the host side (or nowhere): the board boots without it
        drive = next((i for i, a in enumerate(cmd) if a.startswith(f"file={image},")), None)
        dev = next((i for i, a in enumerate(cmd) if a.startswith("virtio-blk-pci,drive=")), None)
        if drive is None or dev is None:
            raise InfraError("cannot find the disk in QEMU's command line (hil.qemu.target "
                             "changed?)", part="emulator", rig=self.rig)
        return [a for i, a in enumerate(cmd) if i not in (drive - 1, drive, dev - 1, dev)]

    def _power_on(self) -> None:
        sock_path = self.target.console_sock
        sock_path.unlink(missing_ok=True)
        self.target.qmp_sock.unlink(missing_ok=True)
        qemu = Daemon("QEMU board", self._command(), self.runtime / "board" / "qemu.log",
                      rig=self.rig).start()
        self.qemu = qemu
        self.power_ons += 1

        def connected() -> socket.socket | None:
            qemu.check()
            if not sock_path.exists():
                return None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(sock_path))
            except ConnectionRefusedError:  # bound, not listening yet (a loaded host)
                sock.close()
                return None
            return sock

        # QEMU creates its socket within milliseconds of starting; nothing to wait on
        sock = wait_until(connected, 15, "QEMU to listen on its serial socket",
                          seen=lambda: "no socket yet" if not sock_path.exists() else
                          "connection refused", interval=0.01, part="emulator", rig=self.rig)
        self.uart.attach(sock)  # QEMU holds the CPU until this connection (wait=on)
        log.debug("%s: board powered on", self.rig)

    def _cut(self) -> None:
        qemu, self.qemu = self.qemu, None
        self.uart.detach()
        if qemu is not None:
            qemu.stop(grace=0)  # SIGKILL: no clean shutdown, like pulling the plug
            log.debug("%s: board powered off", self.rig)
