"""Child daemons of the emulator (QEMU, ser2net, pdudaemon, libvirtd), run in the foreground.

PID 1 on CI hosts does not reap orphans, so nothing is allowed to fork into the background:
every daemon runs under ``Popen`` in its own session (a Ctrl-C at the terminal reaches us, and
we stop the children in order), is killed with its whole process group and reaped. Where
util-linux ``setpriv`` exists, the child also gets a parent-death signal, so even a SIGKILLed
test run leaves no QEMU holding a port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from hil.errors import InfraError, log_tail

log = logging.getLogger(__name__)


def _death_signal_prefix() -> list[str]:
    # The signal fires when the *thread* that forked exits; the emulator forks only from
    # threads that live as long as the child (main, relay board, control socket).
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class Daemon:
    def __init__(self, name: str, argv: Sequence[str], log_file: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 part: str = "emulator", rig: str = "") -> None:
        self.name, self.argv, self.log_file = name, list(argv), log_file
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.part, self.rig = part, rig
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        if shutil.which(self.argv[0]) is None and not Path(self.argv[0]).is_file():
            raise InfraError(f"{self.name}: {self.argv[0]} is not installed", part=self.part,
                             rig=self.rig)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.debug("%s: %s", self.name, " ".join(self.argv))
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(_death_signal_prefix() + self.argv,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise if the daemon died (with the end of its log)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise InfraError(f"{self.name} exited with status {self.proc.returncode}:\n"
                             f"{self.log_tail()}", part=self.part, rig=self.rig)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds, and reap."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                if wait <= 0:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc.poll() is None:
            log.error("%s (pid %d) survived SIGKILL", self.name, proc.pid)
        else:
            # the group may hold children that outlived the leader (a shell's command)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_file, lines)


def tcp_listening(port: int, pid: int | None = None) -> bool:
    """Whether something (with ``pid``: that process) listens on TCP ``port``, from
    /proc/net/tcp{,6}: connecting to find out would count as a client (ser2net would open the
    tty for it and refuse the next one)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    if pid is None or not inodes:
        return bool(inodes)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    owned = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            owned.add(os.readlink(fd))
    return any(f"socket:[{inode}]" in owned for inode in inodes)
