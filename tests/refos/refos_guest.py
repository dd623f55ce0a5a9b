"""Helpers of the reference OS integration tests: a QEMU guest driven over its serial console
(pexpect on -serial stdio) and SSH.

This is a small stand-in until the framework's own QEMU target and console layer exist; every
wait has a deadline and the QEMU process is always killed at the end (a power cut).
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect

from hil.refos import RefosImage
from hil.refos.qemu import qemu_argv

ARCHES = [a for a in os.environ.get("HIL_REFOS_ARCHES", "aarch64,x86_64").split(",") if a]

# Deadlines (seconds, TCG on a shared 2-core machine; generous to stay deterministic)
BOOT_TIMEOUT = {"aarch64": 60.0, "x86_64": 90.0}
CMD_TIMEOUT = 30.0

BOOT_RE = re.compile(r"HIL-BOOT: root=(\d) resin_root_part=(\d) bootcount=(\d+) "
                     r"upgrade_available=(\d)")
READY_RE = re.compile(r"HIL-READY (\S+) (\S+)\r*\n")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class Boot:
    """What the bootloader printed for one boot."""

    root: int
    resin_root_part: int
    bootcount: int
    upgrade_available: int


@dataclass(frozen=True)
class Images:
    v1: RefosImage
    v2: RefosImage  # also every failing update, broken in place once installed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Guest:
    """One QEMU run of a disk image. ``kill()`` is a power cut; ``start()`` powers on again."""

    def __init__(self, arch: str, disk: Path, log_path: Path,
                 uboot_env: Path | None = None) -> None:
        self.arch, self.disk, self.log_path = arch, disk, log_path
        self.uboot_env = uboot_env
        self.ssh_port = free_port()
        self.proc: pexpect.spawn | None = None
        self._n = 0
        self.started = 0.0
        self._log = log_path.open("a", encoding="utf-8", errors="replace")

    # --- power -----------------------------------------------------------------------------
    def start(self) -> None:
        assert self.proc is None or not self.proc.isalive(), "already running"
        argv = qemu_argv(self.arch, self.disk, ssh_port=self.ssh_port, uboot_env=self.uboot_env)
        self._log.write(f"\n===== power on: {' '.join(argv)}\n")
        self.started = time.monotonic()
        self.proc = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                                  timeout=CMD_TIMEOUT, maxread=65536,
                                  searchwindowsize=65536)
        self.proc.logfile_read = self._log
        self.proc.delayafterclose = 0.1
        self.proc.delayafterterminate = 0.1

    def kill(self) -> None:
        """Power cut: SIGKILL, no shutdown."""
        if self.proc is not None:
            self.proc.terminate(force=True)
            self.proc.close(force=True)
            self.proc = None
        self._log.flush()

    def close(self) -> None:
        self.kill()
        self._log.close()

    # --- console ---------------------------------------------------------------------------
    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        assert self.proc is not None
        try:
            self.proc.expect(pattern, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            kind = "timeout" if isinstance(exc, pexpect.TIMEOUT) else "QEMU exited"
            raise AssertionError(f"{kind} after {timeout:.0f}s waiting for {pattern!r}; "
                                 f"console tail:\n{self.tail()}") from None
        match = self.proc.match
        assert isinstance(match, re.Match)
        return match

    def tail(self, n: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return ANSI_RE.sub("", text[-n:])

    def wait_boot(self, timeout: float | None = None) -> Boot:
        """The next HIL-BOOT line from the bootloader."""
        m = self.expect(BOOT_RE, timeout or BOOT_TIMEOUT[self.arch])
        return Boot(*(int(g) for g in m.groups()))

    def wait_ready(self, timeout: float | None = None) -> tuple[str, str]:
        """HIL-READY (version, hostname), then the root prompt (development mode)."""
        m = self.expect(READY_RE, timeout or BOOT_TIMEOUT[self.arch])
        version, host = m.group(1), m.group(2)
        return version, host

    def wait_prompt(self, timeout: float = CMD_TIMEOUT) -> None:
        assert self.proc is not None
        self.proc.sendline("")
        self.expect(r"# (\x1b\[6n)?", timeout)

    def run(self, cmd: str, timeout: float = CMD_TIMEOUT, check: bool = True) -> str:
        """Run ``cmd`` in the console's root shell; return its output (stdout+stderr)."""
        assert self.proc is not None
        self._n += 1
        n = self._n
        self.proc.sendline(f"echo __B{n}__; {cmd} 2>&1; echo __E{n}__$?__")
        self.expect(rf"__B{n}__\r*\n", timeout)
        m = self.expect(rf"__E{n}__(\d+)__", timeout)
        out = ANSI_RE.sub("", self.proc.before or "").replace("\r", "").strip("\n")
        rc = int(m.group(1))
        if check and rc != 0:
            raise AssertionError(f"`{cmd}` exited {rc}:\n{out}")
        return out

    def reboot(self) -> None:
        """``reboot`` at the console: systemd stops the shell before it could answer."""
        assert self.proc is not None
        self.proc.sendline("reboot")

    def exists(self, path: str) -> bool:
        return self.run(f"test -e {path} && echo yes || echo no") == "yes"


def ssh_run(port: int, cmd: str, timeout: float = 20.0,
            stdin: str | bytes | None = None) -> tuple[int, str]:
    """Run ``cmd`` as root over SSH (port forwarded to the guest's 22222), with the passwordless
    login of development mode. Raises paramiko's errors when refused."""
    import paramiko

    client = paramiko.SSHClient()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeout
        transport.start_client(timeout=timeout)
        transport.auth_none("root")
        client._transport = transport  # type: ignore[attr-defined]
        chan_in, stdout, _ = client.exec_command(cmd + " 2>&1", timeout=timeout)
        if stdin is not None:
            chan_in.write(stdin)
            chan_in.channel.shutdown_write()
        out = stdout.read().decode(errors="replace")
        rc = stdout.channel.recv_exit_status()
        return rc, out.strip()
    finally:
        client.close()
