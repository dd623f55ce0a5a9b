"""pyserial URL handler for ``unix:///path/to/socket``: a serial line exported on a unix socket
(QEMU's ``-chardev socket,path=...``, socat). Lets QEMU consoles take the same code path as
``/dev/ttyUSB0`` and ``rfc2217://``. Registered by ``hil.console`` on import."""

from __future__ import annotations

import socket

import serial
from serial.urlhandler import protocol_socket


class Serial(protocol_socket.Serial):  # type: ignore[misc]
    def open(self) -> None:
        self.logger = None
        if self._port is None:
            raise serial.SerialException("Port must be configured before it can be used.")
        if self.is_open:  # type: ignore[has-type]
            raise serial.SerialException("Port is already open.")
        path = self.from_url(self.portstr)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise serial.SerialException(f"could not open port {self.portstr}: {exc}") from exc
        sock.setblocking(False)
        self._socket = sock
        self.is_open = True
        if not self._dsrdtr:
            self._update_dtr_state()
        if not self._rtscts:
            self._update_rts_state()
        self.reset_input_buffer()

    def from_url(self, url: str) -> str:
        if not url.startswith("unix://"):
            raise serial.SerialException(f"expected a unix:///path URL, got {url!r}")
        return url[len("unix://"):]
