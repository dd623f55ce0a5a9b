"""The device under test as the suites see it: run commands, reboot, power-cycle, SSH."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hil.console.log import StopEvent
from hil.console.shell import CommandFailed, ConsoleShell, Result
from hil.errors import DeadlineError, DeviceError, InfraError
from hil.rig import Rig

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)


class Dut:
    def __init__(self, rig: Rig, *, ssh_key: Path | None = None) -> None:
        self.rig = rig
        self.shell = ConsoleShell(rig.console, user=rig.config.ssh.user)
        self.ssh_key = ssh_key
        self.boots = 0  # boots this session has seen through the framework
        self.os: Any = None  # host-OS adapter, set by the plugin

    @property
    def timeouts(self) -> Any:
        return self.rig.config.timeouts

    # --- readiness ------------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for a root shell on the console after power-on or reboot. Returns seconds."""
        with self.rig.step("wait for shell", "console"):
            took = self.shell.wait_ready(timeout or self.timeouts.boot)
        self.rig.state = "ready"
        self.boots += 1
        return took

    def boot(self) -> float:
        self.rig.power_on()
        return self.wait_ready()

    # --- commands -------------------------------------------------------------------------------
    def run(self, command: str, timeout: float | None = None) -> Result:
        return self.shell.run(command, timeout or self.timeouts.command)

    def run_check(self, command: str, timeout: float | None = None) -> Result:
        result = self.run(command, timeout)
        if not result.ok:
            raise CommandFailed(result)
        return result

    def boot_id(self) -> str:
        return self.run_check("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    # --- restarts -------------------------------------------------------------------------------
    def reboot(self, timeout: float | None = None, command: str = "reboot") -> float:
        """Soft reboot through the OS. Waits for the kernel to go down, then for a new shell."""
        with self.rig.log.tally.timing("boot"):
            return self._reboot(timeout or self.timeouts.boot, command)

    def _reboot(self, timeout: float, command: str) -> float:
        t0 = time.monotonic()
        at = self.shell.send(command)
        self.shell.invalidate()
        try:
            import re

            self.rig.log.wait_for(re.compile(rb"(?!)"), at, min(timeout, 60.0),
                                  f"the board to restart after {command!r}",
                                  stop_on=("reset", "boot", "panic"))
        except StopEvent as exc:
            if exc.event.kind == "panic":
                raise DeviceError(f"kernel panic during {command!r}: {exc.event.text}\n"
                                  f"--- console tail ---\n{exc.tail}") from None
        except DeadlineError as exc:
            raise DeviceError(f"{command!r} did not restart the board: {exc}") from None
        self.wait_ready(max(1.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def power_cycle(self) -> float:
        """Hard: cut the power, wait the rig's off-time, power on, wait for a shell."""
        t0 = time.monotonic()
        self.shell.invalidate()
        self.rig.power_cycle()
        self.wait_ready()
        return time.monotonic() - t0

    def recover(self) -> None:
        """After a failed test: get back to a usable shell, power-cycling if needed."""
        if self.shell.ready:
            try:
                self.shell.run("true", 5)
                return
            except (DeadlineError, DeviceError, InfraError) as exc:
                log.warning("rig %s: shell unusable after failure (%s); power-cycling",
                            self.rig.name, exc)
        self.power_cycle()

    # --- SSH ------------------------------------------------------------------------------------
    def ssh(self, *, key: Path | None = None, timeout: float = 30.0) -> paramiko.SSHClient:
        """An SSH client logged in as root on the OS's SSH port (22222 on balenaOS)."""
        with self.rig.log.tally.timing("ssh"):
            return self._ssh(key, timeout)

    def _ssh(self, key: Path | None, timeout: float) -> paramiko.SSHClient:
        import paramiko

        if self.rig.network is None:
            raise InfraError("the rig has no network part to reach the DUT over SSH",
                             part="network", rig=self.rig.name)
        host, port = self.rig.network.ssh_endpoint()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        key_file = key or self.ssh_key
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.connect(host, port=port, username=self.rig.config.ssh.user,
                               key_filename=str(key_file) if key_file else None,
                               look_for_keys=False, allow_agent=False, timeout=5,
                               banner_timeout=5, auth_timeout=5)
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

    def ssh_run(self, command: str, timeout: float | None = None, *,
                key: Path | None = None) -> Result:
        """Run over SSH: stdout and stderr separate."""
        with self.rig.log.tally.timing("ssh"):
            return self._ssh_run(command, timeout, key)

    def _ssh_run(self, command: str, timeout: float | None, key: Path | None) -> Result:
        client = self.ssh(key=key)
        with contextlib.closing(client):
            t0 = time.monotonic()
            _, out, err = client.exec_command(command, timeout=timeout or self.timeouts.command)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
            code = out.channel.recv_exit_status()
            return Result(command, stdout, stderr, code, time.monotonic() - t0)
