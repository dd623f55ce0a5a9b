"""QEMU boards: the same parts as a bench (power, console, storage, network), in software."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from hil.errors import InfraError

# TCG translation cache, MiB (QEMU's default: 1024). QEMU keeps translations across a guest
# reboot; with a cache that seldom fills, a bootloader copying a kernel over the old kernel's
# code pages crawls (GRUB's byte-wise copy took minutes). Smaller, it fills and flushes often.
TB_SIZE_MIB = 256


def kill_session(proc: subprocess.Popen[bytes], what: str, *, part: str, rig: str) -> None:
    """SIGKILL a helper started in a session of its own (QEMU, nbdkit) and reap it: a power cut,
    with nothing flushed or shut down cleanly."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise InfraError(f"{what} pid {proc.pid} survived SIGKILL for 10 s", part=part,
                             rig=rig) from None


def board_processes(runtime: Path) -> list[tuple[int, str]]:
    """(pid, program) of QEMU boards and their disks' nbdkit whose command line points into
    ``runtime``: what must be gone once a session that used that directory has ended."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        program = cmd.split(b"\0")[0].decode(errors="replace")
        if (str(runtime).encode() in cmd
                and ("qemu-system" in program or Path(program).name == "nbdkit")):
            found.append((int(proc.name), program))
    return found


