"""Running host-OS commands over SSH (port 22222) on one kept-open connection.

Why a second transport next to the console: SSH output never reaches the console log (so a
command may read ``config.json`` with its keys), it cannot be interleaved with messages the OS
prints to ``/dev/console``, it streams stdin (an update image), and it is the only way in on a
production device, whose console has no root shell.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from hil.console.shell import Result
from hil.errors import DeadlineError, DeviceError, InfraError

if TYPE_CHECKING:
    import paramiko

    from hil.dut import Dut

log = logging.getLogger(__name__)

# Host OS tools live in sbin too; a non-login SSH command may get a short PATH.
PATH_PREFIX = "PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH; export PATH; "
RESTART_EVENTS = ("boot", "reset", "panic", "power-off", "power-on")


class SshShell:
    """One paramiko connection, reopened after the board restarted (a console boot event)."""

    def __init__(self, dut: Dut) -> None:
        self.dut = dut
        self._client: paramiko.SSHClient | None = None
        self._since = 0  # console offset at connect: a restart after it drops the connection

    @property
    def available(self) -> bool:
        return self.dut.rig.network is not None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _connected(self, timeout: float) -> paramiko.SSHClient:
        restarted = self.dut.rig.log.events_since(self._since, RESTART_EVENTS)
        transport = self._client.get_transport() if self._client else None
        if self._client is None or restarted or transport is None or not transport.is_active():
            self.close()
            self._since = self.dut.rig.log.end
            self._client = self.dut.ssh(timeout=timeout)
        return self._client

    def run(self, command: str, timeout: float = 60.0, *, stdin: bytes | None = None,
            connect_timeout: float = 60.0) -> Result:
        """Run ``command`` (stdout and stderr merged, like the console). A command whose
        channel could not be opened is retried once on a fresh connection; one that started is
        never re-run."""
        with self.dut.rig.log.tally.timing("ssh"):
            return self._run(command, timeout, stdin, connect_timeout)

    def _run(self, command: str, timeout: float, stdin: bytes | None,
             connect_timeout: float) -> Result:
        import paramiko

        channel = None
        for attempt in (1, 2):
            client = self._connected(connect_timeout)
            transport = client.get_transport()
            try:
                if transport is None:
                    raise paramiko.SSHException("no transport")
                channel = transport.open_session(timeout=10)
                break
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self.close()
                if attempt == 2:
                    raise InfraError(f"cannot open an SSH channel to the board: {exc}",
                                     part="network", rig=self.dut.rig.name) from None
        assert channel is not None
        return self._exec(channel, command, timeout, stdin)

    def host_key(self) -> Any:
        """The SSH host key the device presented (paramiko PKey)."""
        transport = self._connected(60.0).get_transport()
        if transport is None:
            raise InfraError("SSH transport closed", part="network", rig=self.dut.rig.name)
        return transport.get_remote_server_key()

    def start(self, command: str, connect_timeout: float = 60.0) -> Any:
        """Start ``command`` and return its paramiko channel without waiting (the caller may
        cut the power while it runs)."""
        client = self._connected(connect_timeout)
        transport = client.get_transport()
        if transport is None:
            raise InfraError("SSH transport closed", part="network", rig=self.dut.rig.name)
        channel = transport.open_session(timeout=10)
        channel.set_combine_stderr(True)
        channel.exec_command(PATH_PREFIX + command)
        return channel

    def _exec(self, channel: Any, command: str, timeout: float, stdin: bytes | None) -> Result:
        t0 = time.monotonic()
        deadline = t0 + timeout
        channel.set_combine_stderr(True)
        channel.settimeout(1.0)
        chunks: list[bytes] = []
        try:
            channel.exec_command(PATH_PREFIX + command)
            if stdin is not None:
                view = memoryview(stdin)
                for i in range(0, len(view), 1 << 16):
                    channel.sendall(view[i:i + (1 << 16)])
                    if time.monotonic() > deadline:
                        break
                channel.shutdown_write()
            while True:
                try:
                    data = channel.recv(1 << 16)
                except TimeoutError:
                    data = None
                if data:
                    chunks.append(data)
                elif channel.exit_status_ready() and not channel.recv_ready():
                    break
                elif data == b"":  # EOF before the exit status: it is on its way
                    channel.status_event.wait(0.2)
                if time.monotonic() > deadline:
                    seen = b"".join(chunks)[-300:].decode(errors="replace")
                    raise DeadlineError(f"the end of {command!r} over SSH", repr(seen) or
                                        "no output", timeout, tail=self.dut.rig.log.tail())
                if self.dut.rig.log.events_since(self._since, ("boot", "reset", "panic")):
                    if channel.exit_status_ready():
                        break
                    self.close()
                    raise DeviceError(f"the board restarted while {command!r} ran over SSH\n"
                                      f"--- console tail ---\n{self.dut.rig.log.tail()}")
            code = channel.recv_exit_status()
        except (OSError, EOFError) as exc:
            self.close()
            raise DeviceError(f"SSH connection lost while running {command!r}: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        out = b"".join(chunks).decode("utf-8", errors="replace")
        return Result(command, out, None, code, time.monotonic() - t0)
