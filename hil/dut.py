"""The device under test as the suites see it: commands, boots and power, SSH, waits for a
state, pexpect's expect on the console (``dut.console``). Every restart goes through here and
ends the same way: the new boot seen on the console (as the host-OS adapter recognises it),
then a shell."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hil import redact
from hil.config import Timeouts
from hil.console.expect import ConsoleExpect
from hil.console.log import PANIC_MARKER, RESTARTS, EventKind, StopEvent
from hil.console.shell import CommandFailed, ConsoleShell, Result
from hil.deadline import wait_until
from hil.errors import DeadlineError, DeviceError, InfraError, NotReached
from hil.os.balena import BalenaOS
from hil.os.contract import BootRecord, HostOS
from hil.os.hostdisk import HostDisk
from hil.rig import Rig, RigState
from hil.ssh import SshShell

log = logging.getLogger(__name__)
T = TypeVar("T")
NEVER = re.compile(rb"(?!)")  # waits that end only on a console event


class Dut:
    def __init__(self, rig: Rig, *, ssh_key: Path | None = None,
                 host_os: Callable[[Dut], HostOS] = BalenaOS) -> None:
        """``host_os`` makes the OS adapter (``dut.os``) for this device."""
        self.rig = rig
        password = rig.config.console_password()
        redact.register(password)  # masked wherever it might show up (a console that echoes)
        if password and len(password) < redact.MIN_SECRET:
            log.warning("rig %s: the console password is shorter than %d characters: logs and "
                        "reports cannot mask it without masking ordinary words; use a longer one",
                        rig.name, redact.MIN_SECRET)
        self.shell = ConsoleShell(rig.console, user=rig.config.ssh.user, password=password)
        # pexpect's expect/send on the console, for what the shell cannot do (a bootloader)
        self.console = ConsoleExpect(rig.console, timeout=rig.config.timeouts.command)
        self.ssh_key = ssh_key
        self.ssh = SshShell(rig, ssh_key)  # one connection per boot
        self.boots = 0  # boots this session has seen through the framework
        self.os: HostOS = host_os(self)

    @property
    def timeouts(self) -> Timeouts:
        return self.rig.config.timeouts

    @property
    def disk(self) -> HostDisk | None:
        """The board's disk, where it is a file on the rig host (once flashed); else None."""
        return HostDisk.of(self.rig)

    # --- commands -------------------------------------------------------------------------------
    def run(self, command: str, timeout: float | None = None) -> Result:
        """Run on the console's root shell (output merged)."""
        return self.shell.run(command, timeout or self.timeouts.command)

    def run_check(self, command: str, timeout: float | None = None) -> Result:
        result = self.run(command, timeout)
        if not result.ok:
            raise CommandFailed(result)
        return result

    def ssh_run(self, command: str, timeout: float | None = None) -> Result:
        """Run over SSH, on the boot's one connection: stdout and stderr apart."""
        return self.ssh.run(command, timeout or self.timeouts.command, merge=False)

    def boot_id(self) -> str:
        return self.run_check("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def poll(self, probe: Callable[[], T | None], timeout: float, expected: str,
             seen: Callable[[], str], interval: float = 1.0) -> T:
        """Look at the device until ``probe`` returns a value (not None or False). The device
        not getting there in time is a broken promise: ``NotReached``, a test failure naming
        ``expected`` and what was ``seen`` last. A rig fault in the probe stays infra."""
        with self.rig.log.tally.timing("poll"):  # all of it is waiting on the device
            try:
                return wait_until(probe, timeout, expected, seen=seen, interval=interval)
            except DeadlineError as exc:
                raise NotReached(expected, exc.seen, timeout, tail=self.rig.log.tail()
                                 ) from None

    # --- boots and power ------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for a root shell on the console; returns seconds. After a restart, call it only
        once ``await_boot`` has seen the new boot: typed into a UART the kernel has not taken
        over yet, the shell's set-up line is lost (QEMU's PL011 then drops all input)."""
        with self.rig.step("wait for shell", "console", device_wait=True):
            took = self.shell.wait_ready(timeout or self.timeouts.boot)
        self.rig.state = RigState.READY
        self.os.learn()
        self.boots += 1
        return took

    def await_boot(self, start: int, timeout: float | None = None) -> BootRecord:
        """The next boot of the OS after console offset ``start`` (its bootloader's run).
        ``dut.console`` reads on from ``start``: the restart before it is history."""
        pattern, expected = self.os.boot_signature()
        with self.rig.log.tally.timing("boot"):
            hit = self.rig.log.wait_for(pattern, start, timeout or self.timeouts.boot, expected)
        self.console.skip_to(start)
        return self.os.boot_record(hit)

    def await_panic(self, start: int, timeout: float | None = None) -> int:
        """Wait for a kernel panic after ``start`` (a root that cannot boot); returns the
        offset after it."""
        with self.rig.log.tally.timing("boot"):
            hit = self.rig.log.wait_for(PANIC_MARKER, start, timeout or self.timeouts.boot,
                                        "a kernel panic (the new root's init fails)")
        return hit.end

    def power_on(self) -> BootRecord:
        """Power on, await the boot, then a shell."""
        at = self.rig.log.end
        self.rig.power_on()
        rec = self.await_boot(at)
        self.wait_ready()
        return rec

    def power_off(self) -> None:
        """Cut the power (no shutdown)."""
        self._going_down("power cut")
        self.rig.power_off()

    def power_cycle(self) -> BootRecord:
        """Hard: cut the power, and on again after the rig's off-time; then a shell."""
        self.power_off()
        return self.power_on()

    def start_reboot(self, command: str = "reboot") -> int:
        """Type ``command`` on the console and return the console offset it was sent at,
        without waiting (the caller follows the boots with ``await_boot``)."""
        self._going_down(f"{command!r} was sent")
        return self.shell.send(command)

    def reboot_via_ssh(self) -> int:
        """Ask the OS to reboot over SSH (a production device has no console shell); returns
        the console offset before it. Does not wait for the new boot."""
        self.os.learn()
        at = self.rig.log.end
        self.ssh.start("reboot")
        self.shell.invalidate("rebooted over SSH")
        return at

    def reboot(self, command: str = "reboot") -> BootRecord:
        """Soft reboot through the OS: the board must go down, boot again, give a shell."""
        at = self.start_reboot(command)
        try:
            self.rig.log.wait_for(NEVER, at, min(self.timeouts.boot, 60.0),
                                  f"the board to restart after {command!r}", stop_on=RESTARTS)
        except StopEvent as exc:
            if exc.event.kind == EventKind.PANIC:
                raise DeviceError(f"kernel panic during {command!r}: {exc.event.text}",
                                  tail=exc.tail) from None
        except DeadlineError as exc:
            raise DeviceError(f"{command!r} did not restart the board: {exc}") from None
        rec = self.await_boot(at)
        self.wait_ready()
        return rec

    def recover(self) -> None:
        """After a failed test: get back to a usable shell, power-cycling if needed."""
        if self.rig.state == RigState.READY and self.shell.ready:
            try:
                if self.rig.log.lost:  # a console that came back late: the board may be fine
                    self.rig.console.attach(timeout=5)
                self.shell.run("true", 5)
                return
            except (DeadlineError, DeviceError, InfraError) as exc:
                log.warning("rig %s: shell unusable after failure (%s); power-cycling",
                            self.rig.name, exc)
        self.power_cycle()

    def _going_down(self, why: str) -> None:
        self.os.learn()  # while a shell is there: the next boot is recognised by it
        self.shell.invalidate(why)
        self.ssh.close()
