"""Targets that must be refused before a byte is written, beyond those of test_writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.flash.writer import flash

from .conftest import ImageFixture

# A writable raw disk as QEMU's file-posix driver locks it: OFD read locks on byte 100 + i for
# each permission bit i it holds (consistent read, write) and 200 + i for each one it does not
# share with other users of the image (write).
QEMU_LOCKS = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for start, length in ((100, 2), (201, 1)):
    lock = struct.pack("hhqqi", fcntl.F_RDLCK, os.SEEK_SET, start, length, 0) + bytes(16)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
print("locked", flush=True)
sys.stdin.read()  # hold the locks until the test closes our stdin
"""


def _proc_locks(path: Path) -> list[str]:
    st = path.stat()
    key = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return [line for line in Path("/proc/locks").read_text().splitlines() if key in line]


def test_disk_file_of_a_running_qemu_is_refused_untouched(image: ImageFixture,
                                                          tmp_path: Path) -> None:
    disk = tmp_path / "qemu-disk.img"
    old = b"\xa5 disk of a running VM \x5a" * 4096
    disk.write_bytes(old)
    holder = subprocess.Popen([sys.executable, "-c", QEMU_LOCKS, str(disk)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        locks = _proc_locks(disk)
        assert locks and all("OFDLCK" in line for line in locks)  # pid -1: not in fcntl's answer
        with pytest.raises(InfraError, match=rf"refusing to write {disk}: it is in use: "
                           rf"pid {holder.pid} \(python.*\) holds a lock on {disk}"):
            flash(image.raw, disk, display=False)
        assert disk.read_bytes() == old  # not even truncated
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    flash(image.raw, disk, display=False)  # once the VM is gone the file is fair game
    assert disk.read_bytes()[: image.size] == image.data
