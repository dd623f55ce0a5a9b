"""Exclusive rig lock. ``flock`` dies with its process, so a SIGKILLed or cancelled holder frees
the rig at once (no stale locks to clean by hand). The file names the holder for whoever waits."""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from hil.errors import InfraError

POLL = 0.25  # flock has no "released" event to wait on


def lock_dir() -> Path:
    path = Path(os.environ.get("HIL_LOCK_DIR") or "/tmp/hil-locks")
    path.mkdir(parents=True, exist_ok=True)
    return path


class RigLock:
    def __init__(self, rig: str) -> None:
        self.rig = rig
        self.path = lock_dir() / f"{rig}.lock"
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
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
                    raise InfraError(f"rig is in use by {holder}"
                                     + (f"; waited {wait:.0f}s" if wait else "")
                                     + " (--rig-wait=SECONDS to wait longer)",
                                     part="lock", rig=self.rig) from None
                if not told and on_wait:
                    on_wait(f"rig {self.rig} is in use by {holder}; waiting up to {wait:.0f}s")
                    told = True
                time.sleep(POLL)
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

    @property
    def held(self) -> bool:
        return self._fd is not None
