"""A disk with a volatile write cache, as an SD card or an SSD has one.

QEMU writes a guest's disk into the host's page cache, so a power cut (SIGKILL) keeps every
write the guest made, flushed or not: an OS that never flushes would pass every power-cut test.
Here the board's disk is served by nbdkit with its cache filter in writeback mode: writes stay
in nbdkit's memory until the guest flushes (fsync, a journal commit, ``sync``), and killing
nbdkit with the board's power loses whatever was not flushed, as a real card loses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hil.deadline import wait_until
from hil.errors import InfraError, log_tail
from hil.qemu import kill_session


class VolatileWriteCache:
    """nbdkit serving ``disk`` on a unix socket, started and killed with the board's power."""

    def __init__(self, disk: Path, runtime: Path, rig: str) -> None:
        self.disk, self.rig = disk, rig
        self.socket = runtime / "disk.nbd"
        self.pidfile = runtime / "nbdkit.pid"
        self.log_path = runtime / "nbdkit.log"
        self.cache_dir = runtime / "write-cache"  # nbdkit's cache file (unlinked at once)
        self.proc: subprocess.Popen[bytes] | None = None

    def drive(self, node: str) -> list[str]:
        """QEMU arguments for a block node ``node`` on this disk. QEMU passes the guest's flushes
        on to nbdkit (its default writeback mode; ``cache=unsafe`` would drop them)."""
        return ["-blockdev", f"driver=nbd,server.type=unix,server.path={self.socket},"
                f"node-name={node},cache.direct=off,cache.no-flush=off"]

    def start(self) -> None:
        binary = shutil.which("nbdkit")
        if binary is None:
            raise InfraError("nbdkit is not installed (apt package nbdkit); it gives the QEMU "
                             "board's disk a volatile write cache (write_cache: volatile)",
                             part="storage", rig=self.rig)
        for path in (self.socket, self.pidfile):
            path.unlink(missing_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        cmd = [binary, "--foreground", "--exit-with-parent", "--unix", str(self.socket),
               "--pidfile", str(self.pidfile), "--filter=cache", "file", f"file={self.disk}",
               "cache=writeback", "cache-on-read=false",
               # a 4 KiB cache block: a partly flushed 64 KiB block would keep more than a card
               "cache-min-block-size=4096"]
        with self.log_path.open("ab") as out:
            # its own session: a Ctrl-C at the terminal must not cut the disk before the board
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env={**os.environ, "TMPDIR": str(self.cache_dir)},
                                         start_new_session=True)
        proc = self.proc

        def serving() -> bool:
            if proc.poll() is not None:
                raise InfraError(f"nbdkit exited with {proc.returncode} at start:\n"
                                 + log_tail(self.log_path), part="storage", rig=self.rig)
            return self.pidfile.exists()  # written once it accepts connections

        wait_until(serving, 15, f"nbdkit to serve {self.disk.name} on {self.socket.name}",
                   seen=lambda: "no pid file yet", interval=0.01, part="storage", rig=self.rig)

    def cut(self) -> None:
        """Power gone: the cache and every write it held are lost (SIGKILL, no flush)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            kill_session(proc, "nbdkit", part="storage", rig=self.rig)
        self.socket.unlink(missing_ok=True)
