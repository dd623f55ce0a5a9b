"""A real shell behind a unix socket, standing in for a board's serial line.

``/bin/sh`` runs on a pty (so echo, line discipline and job control are real); a bridge copies
bytes between the pty and the socket that ``SerialConsole`` opens as ``unix://``. ``inject``
writes straight onto the line, as a kernel printing on the console would; ``rewrite`` changes
what the shell wrote, to put such a line exactly where a test needs it, and ``rewrite_in`` what
was typed, as a garbling line would.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import socket
import subprocess
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.config import load_device_type
from hil.console.serial import SerialConsole, SerialSettings
from hil.registry import PartContext


def _take_tty() -> None:
    # As getty does: the pty becomes the controlling terminal, so ^C reaches the foreground job.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # and ^C kills: a shell keeps SIGINT ignored if it was at its start (as it is for a
    # background job of a non-interactive shell that may have started these tests)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


REPLY_FILES = Path("/tmp/.hil-console-*")  # ConsoleShell's reply file, one per session


class ShellLine:
    def __init__(self, path: Path, prompt: str = "# ", login: bool = False,
                 script: str = "") -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.prompt, self.login, self.script = prompt, login, script
        self._stop = False
        self._replies_before = set(REPLY_FILES.parent.glob(REPLY_FILES.name))
        # applied to each read of the pty, and of the socket
        self.rewrite: Callable[[bytes], bytes] | None = None
        self.rewrite_in: Callable[[bytes], bytes] | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        self.conn = conn
        master, slave = pty.openpty()
        env = {"PS1": self.prompt, "PATH": "/usr/bin:/bin", "HOME": "/tmp", "ENV": ""}
        script = self.script or ("read -p 'login: ' u; exec sh -i" if self.login else
                                 "exec sh -i")
        self.proc = subprocess.Popen(["sh", "-c", script], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, start_new_session=True,
                                     preexec_fn=_take_tty)
        os.close(slave)
        while not self._stop:
            ready, _, _ = select.select([master, conn], [], [], 0.1)
            try:
                if master in ready:
                    data = os.read(master, 65536)
                    if not data:
                        break
                    conn.sendall(self.rewrite(data) if self.rewrite else data)
                if conn in ready:
                    data = conn.recv(65536)
                    if not data:
                        break
                    os.write(master, self.rewrite_in(data) if self.rewrite_in else data)
            except OSError:
                break
        os.close(master)

    def inject(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def close(self) -> None:
        self._stop = True
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        if self.conn:
            self.conn.close()
        self.server.close()
        # the framing's reply file lands in this machine's /tmp (a device's is a tmpfs)
        for leftover in set(REPLY_FILES.parent.glob(REPLY_FILES.name)) - self._replies_before:
            leftover.unlink(missing_ok=True)


@pytest.fixture
def line(tmp_path: Path) -> Iterator[ShellLine]:
    sl = ShellLine(tmp_path / "tty.sock")
    yield sl
    sl.close()


def open_console(path: Path, tmp_path: Path, timeout: float = 5) -> SerialConsole:
    """The framework's console on the line at ``path`` (a unix socket), attached."""
    ctx = PartContext("fake", "console", tmp_path, load_device_type("generic-aarch64"))
    con = SerialConsole(SerialSettings(url=f"unix://{path}"), ctx)
    con.attach(timeout=timeout)
    return con


@pytest.fixture
def console(tmp_path: Path, line: ShellLine) -> Iterator[SerialConsole]:
    con = open_console(line.path, tmp_path)
    yield con
    con.close()
