"""Commands over SSH (port 22222 on balenaOS) on one connection per boot.

Why a second transport next to the console: SSH output never reaches the console log (so a
command may read ``config.json`` with its keys), it cannot be interleaved with messages the OS
prints to ``/dev/console``, it streams stdin (an update image), and it is the only way in on a
production device, whose console has no root shell.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hil.console.log import NO_REPLY, EventKind
from hil.console.shell import Result
from hil.errors import DeadlineError, DeviceError, HilError, InfraError

if TYPE_CHECKING:
    import paramiko

    from hil.rig import Rig

log = logging.getLogger(__name__)

# Host OS tools live in sbin too; a non-login SSH command may get a short PATH.
PATH_PREFIX = "PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH; export PATH; "
# A connection opened before any of these is stale: the board restarted under it.
RESTART_EVENTS = (EventKind.BOOT, EventKind.RESET, EventKind.PANIC, EventKind.POWER_OFF,
                  EventKind.POWER_ON)


class SshShell:
    """One paramiko connection, reopened after the board restarted (a console boot event)."""

    def __init__(self, rig: Rig, key: Path | None = None) -> None:
        self.rig = rig
        self.key = key
        self._client: paramiko.SSHClient | None = None
        self._since = 0  # console offset at connect: a restart after it drops the connection

    @property
    def available(self) -> bool:
        return self.rig.network is not None

    def connect(self, *, key: Path | None = None, timeout: float = 30.0) -> paramiko.SSHClient:
        """A new client logged in as the rig's SSH user (root), retried while sshd starts."""
        import paramiko

        if self.rig.network is None:
            raise InfraError("the rig has no network part to reach the DUT over SSH",
                             part="network", rig=self.rig.name)
        host, port = self.rig.network.ssh_endpoint()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        key_file = key or self.key
        deadline = time.monotonic() + timeout
        while True:
            try:
                # sshd starts per connection (balenaOS's sshd.socket): on a busy board its
                # banner and key exchange (paramiko's `timeout`) can take many seconds, and a
                # client that gives up and retries only adds sshd instances that compete for
                # the same CPU
                client.connect(host, port=port, username=self.rig.config.ssh.user,
                               key_filename=str(key_file) if key_file else None,
                               look_for_keys=False, allow_agent=False, timeout=30,
                               banner_timeout=30, auth_timeout=30)
                return client
            except paramiko.AuthenticationException:
                client.close()
                raise
            except (OSError, paramiko.SSHException) as exc:
                # sshd may still be starting after boot: the port refuses or drops us
                if time.monotonic() >= deadline:
                    client.close()
                    raise DeadlineError(f"SSH on {host}:{port}", str(exc), timeout,
                                        tail=self.rig.log.tail()) from None
                time.sleep(0.5)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _connected(self, timeout: float) -> paramiko.SSHClient:
        restarted = self.rig.log.events_since(self._since, RESTART_EVENTS)
        transport = self._client.get_transport() if self._client else None
        if self._client is None or restarted or transport is None or not transport.is_active():
            self.close()
            self._since = self.rig.log.end
            with self.rig.log.tally.timing("ssh"):
                self._client = self.connect(timeout=timeout)
        return self._client

    def run(self, command: str, timeout: float = 60.0, *, stdin: bytes | None = None,
            connect_timeout: float = 60.0, merge: bool = True) -> Result:
        """Run ``command``: stdout and stderr merged like the console's, or apart
        (``merge=False``). A command whose channel could not be opened is retried once on a
        fresh connection; one that started is never re-run."""
        with self.rig.log.tally.timing("ssh"), self.rig.log.command("ssh", command) as record:
            result = self._run(command, timeout, stdin, connect_timeout, merge)
            record.exit_code = result.exit_code
            return result

    def _run(self, command: str, timeout: float, stdin: bytes | None,
             connect_timeout: float, merge: bool) -> Result:
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
                                     part="network", rig=self.rig.name) from None
        assert channel is not None
        return self._exec(channel, command, timeout, stdin, merge)

    def host_key(self) -> Any:
        """The SSH host key the device presented (paramiko PKey)."""
        transport = self._connected(60.0).get_transport()
        if transport is None:
            raise InfraError("SSH transport closed", part="network", rig=self.rig.name)
        return transport.get_remote_server_key()

    def tcp(self, port: int, timeout: float = 30.0) -> Any:
        """A socket-like paramiko channel to ``127.0.0.1:port`` on the device (SSH local
        forwarding): how the host reaches a service that listens on the device only.
        ``ConnectionRefusedError`` when nothing listens there (the device's doing)."""
        import paramiko

        transport = self._connected(60.0).get_transport()
        try:
            if transport is None:
                raise paramiko.SSHException("no transport")
            channel = transport.open_channel("direct-tcpip", ("127.0.0.1", port),
                                             ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:  # the device answered: nothing listens there
            raise ConnectionRefusedError(f"port {port} on the device: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise InfraError(f"cannot open an SSH channel to port {port} on the board: {exc}",
                             part="network", rig=self.rig.name) from None
        channel.settimeout(timeout)
        return channel

    def start(self, command: str, connect_timeout: float = 60.0) -> Any:
        """Start ``command`` and return its paramiko channel without waiting (the caller may
        cut the power while it runs)."""
        client = self._connected(connect_timeout)
        transport = client.get_transport()
        if transport is None:
            raise InfraError("SSH transport closed", part="network", rig=self.rig.name)
        with self.rig.log.command("ssh", command) as record:
            channel = transport.open_session(timeout=10)
            channel.set_combine_stderr(True)
            channel.exec_command(PATH_PREFIX + command)
            record.error = NO_REPLY
        return channel

    def _send(self, channel: Any, data: bytes, command: str, deadline: float,
              timeout: float) -> None:
        """All of ``data`` to the command's stdin, then EOF. A slow reader (a board loading an
        image under emulation) keeps the window shut for seconds: that is waiting, not a lost
        connection, until the command's deadline."""
        view, pos = memoryview(data), 0
        while pos < len(view):
            with contextlib.suppress(TimeoutError):
                pos += channel.send(view[pos:pos + (1 << 16)])
            if time.monotonic() > deadline:
                raise DeadlineError(f"{command!r} over SSH to take its input",
                                    f"{pos} of {len(view)} bytes taken", timeout,
                                    tail=self.rig.log.tail())
        channel.shutdown_write()

    def _lost(self, command: str, exc: BaseException) -> HilError:
        """The connection broke under a running command. The board restarting (its console
        shows the reboot) is the device's doing; a board that stayed up lost its link: the
        rig's network (a cut forward, a dropped port) is at fault."""
        restarted = self.rig.log.events_since(self._since)
        self.close()
        if restarted:
            return DeviceError(f"SSH connection lost while running {command!r}: the board "
                               f"restarted ({restarted[0].text}): {exc}",
                               tail=self.rig.log.tail())
        where = self.rig.network.ssh_endpoint() if self.rig.network else ("?", 0)
        return InfraError(f"SSH connection to the board ({where[0]}:{where[1]}) lost while "
                          f"running {command!r}: {exc or type(exc).__name__}; the board did "
                          "not restart (its console shows no reboot)", part="network",
                          rig=self.rig.name, tail=self.rig.log.tail())

    def _exec(self, channel: Any, command: str, timeout: float, stdin: bytes | None,
              merge: bool) -> Result:
        import paramiko

        t0 = time.monotonic()
        deadline = t0 + timeout
        channel.set_combine_stderr(merge)
        channel.settimeout(1.0)
        chunks: list[bytes] = []
        errors: list[bytes] = []
        try:
            channel.exec_command(PATH_PREFIX + command)
            if stdin is not None:
                self._send(channel, stdin, command, deadline, timeout)
            while True:
                try:
                    data = channel.recv(1 << 16)
                except TimeoutError:
                    data = None
                while channel.recv_stderr_ready():
                    errors.append(channel.recv_stderr(1 << 16))
                if data:
                    chunks.append(data)
                elif channel.exit_status_ready() and not channel.recv_ready() and \
                        not channel.recv_stderr_ready():
                    break
                elif data == b"":  # EOF before the exit status: it is on its way
                    channel.status_event.wait(0.2)
                if time.monotonic() > deadline:
                    seen = b"".join(chunks)[-300:].decode(errors="replace")
                    raise DeadlineError(f"the end of {command!r} over SSH", repr(seen) or
                                        "no output", timeout, tail=self.rig.log.tail())
                if self.rig.log.events_since(self._since):
                    if channel.exit_status_ready():
                        break
                    self.close()
                    raise DeviceError(f"the board restarted while {command!r} ran over SSH",
                                      tail=self.rig.log.tail())
            code = channel.recv_exit_status()
            if code == -1:  # paramiko's "none came": the channel closed under the command
                raise EOFError("the channel closed without the command's exit status")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._lost(command, exc) from None
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        out = b"".join(chunks).decode("utf-8", errors="replace")
        err = None if merge else b"".join(errors).decode("utf-8", errors="replace")
        return Result(command, out, err, code, time.monotonic() - t0)
