"""The emulator's control socket: how bench tools outside the emulator (pdudaemon's
``localcmdline`` commands) reach the emulated hardware.

One line per request (``outlet 1 on``), one line back (``ok`` or ``error: ...``). Run as
``python -m hil.emu.ctl SOCKET outlet 1 on``; kept free of heavy imports because pdudaemon
starts it for every switch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class ControlServer:
    def __init__(self, path: Path, handler: Callable[[list[str]], str]) -> None:
        self.path, self.handler = path, handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ControlServer:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(8)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="emu-ctl", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        server = self._sock  # stop() clears the attribute: accept fails on the closed socket
        assert server is not None
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed by stop()
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.makefile("r").readline()
                    try:
                        reply = self.handler(line.split())
                    except Exception as exc:  # reported to the caller, the server goes on
                        log.exception("emulator control: %r failed", line)
                        reply = f"error: {exc}"
                    conn.sendall((reply.replace("\n", " ") + "\n").encode())
                except OSError:
                    continue

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def request(path: Path | str, words: Sequence[str], timeout: float = 30.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall((" ".join(words) + "\n").encode())
        return sock.makefile("r").readline().strip()


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m hil.emu.ctl SOCKET WORDS...", file=sys.stderr)
        return 2
    try:
        reply = request(argv[0], argv[1:])
    except OSError as exc:
        print(f"hil.emu.ctl: {argv[0]}: {exc}", file=sys.stderr)
        return 1
    print(reply)
    return 0 if reply == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
