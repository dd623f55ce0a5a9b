"""Host-wide exclusive locks: a rig, an NTP port, a cache being built. ``flock`` dies with its
process, so a SIGKILLed or cancelled holder frees it at once (no stale locks to clean by hand)."""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hil.errors import InfraError

POLL = 0.25  # flock has no "released" event to wait on


def lock_dir() -> Path:
    path = Path(os.environ.get("HIL_LOCK_DIR") or "/tmp/hil-locks")
    path.mkdir(parents=True, exist_ok=True)
    return path


class HostLock:
    """``flock`` on ``<lock dir>/<name>.lock`` for one thing on this host that only one session
    may use at a time (a rig, an NTP port); the file names the holder for whoever waits."""

    hint = ""  # appended to the "in use" error: how to wait longer

    def __init__(self, name: str, subject: str, *, part: str = "lock",
                 rig: str = "", directory: Path | None = None) -> None:
        self.subject, self.part, self.rig = subject, part, rig
        self.path = (directory or lock_dir()) / f"{name}.lock"
        self._fd: int | None = None

    def info(self) -> dict[str, Any]:
        """The holder's record (pid, user, host, since, what); empty when free or unreadable."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def holder(self) -> str:
        info = self.info()
        if not info:
            return "unknown holder"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return (f"pid {info.get('pid')} of {info.get('user')}@{info.get('host')} since {since}"
                + (f" ({info['what']})" if info.get("what") else ""))

    def acquire(self, wait: float, what: str = "",
                on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock, waiting up to ``wait`` seconds (0: fail at once if held)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise InfraError(f"{self.subject} is in use by {holder}"
                                     + (f"; waited {wait:.0f}s" if wait else "") + self.hint,
                                     part=self.part, rig=self.rig) from None
                if not told and on_wait:
                    on_wait(f"{self.subject} is in use by {holder}; waiting up to {wait:.0f}s")
                    told = True
                time.sleep(min(POLL, max(deadline - time.monotonic(), 0.0)))
        info = {"pid": os.getpid(), "user": getpass.getuser(), "host": socket.gethostname(),
                "since": time.time(), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def free(self) -> bool:
        """Nobody holds it now: a look that takes it and gives it back at once."""
        try:
            self.acquire(0)
        except InfraError:
            return False
        self.release()
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None


class RigLock(HostLock):
    """The exclusive lock a session holds on its rig."""

    hint = " (--rig-wait=SECONDS to wait longer)"

    def __init__(self, rig: str) -> None:
        super().__init__(rig, "rig", rig=rig)
