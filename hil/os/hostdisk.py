"""The board's disk seen from the rig host, where the rig's storage is a file the host can read
(QEMU boards, virtual SD muxes): the bootloader state exactly as the bootloader will read it,
and a filesystem check of a partition exactly as a power cut left it.

Reading is safe while the board runs (read-only, small files); the filesystem check copies the
partition first, so it never touches the board's disk.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hil.os import parse

if TYPE_CHECKING:
    from hil.flash.partitions import Partition
    from hil.rig import Rig

EXT4_MAGIC = 0xEF53
# U-Boot: both files are read, the later one wins; GRUB: the first block found.
UBOOT_FILES = ("resinOS_uEnv.txt", "bootcount.env")
GRUB_FILES = ("grub/grubenv", "EFI/BOOT/grubenv", "grubenv")


@dataclass(frozen=True)
class DiskPartition:
    number: int
    offset: int
    size: int
    label: str  # ext4 or FAT label, else the GPT name


@dataclass(frozen=True)
class FsCheck:
    clean: bool
    replayed_journal: bool
    output: str  # what e2fsck said

    def summary(self) -> str:
        lines = [ln for ln in self.output.splitlines() if ln.strip()]
        return "\n".join(lines[-20:])


@dataclass(frozen=True)
class HostDisk:
    """The disk a board boots from, where it is a file on the rig host (``Dut.disk``)."""

    path: Path
    bootloader: str  # the device type's: which environment files hold its state
    workdir: Path  # scratch space for copies (the rig's runtime directory)

    @classmethod
    def of(cls, rig: Rig) -> HostDisk | None:
        """The rig's disk, if its storage is a file (else None)."""
        from hil.storage import FileStorage

        storage = rig.storage
        if isinstance(storage, FileStorage) and storage.path.is_file():
            return cls(storage.path, rig.config.device_type.bootloader, rig.runtime)
        return None

    def boot_state(self) -> parse.BootState:
        return boot_state(self.path, self.bootloader)

    def read_boot_file(self, name: str) -> bytes | None:
        return read_boot_file(self.path, name)

    def write_boot_file(self, name: str, data: bytes) -> None:
        """Only while the board is off: the board's own FAT driver caches the partition."""
        write_boot_file(self.path, name, data)

    def fsck(self, label: str = "resin-data") -> FsCheck:
        return fsck(self.path, label, workdir=self.workdir)


def _ext4_label(f: int, offset: int) -> str | None:
    sb = os.pread(f, 1024, offset + 1024)
    if len(sb) < 136 or struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
        return None
    return sb[120:136].split(b"\0", 1)[0].decode("utf-8", errors="replace")


def partitions(disk: Path) -> list[DiskPartition]:
    from hil.flash.partitions import read_partitions

    _, parts = read_partitions(disk)
    out = []
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for p in parts:
            label = _ext4_label(fd, p.start) or p.fs_label or p.name
            out.append(DiskPartition(p.number, p.start, p.size, label))
    finally:
        os.close(fd)
    return out


def partition(disk: Path, *labels: str) -> DiskPartition:
    parts = partitions(disk)
    for p in parts:
        if p.label in labels:
            return p
    found = ", ".join(f"p{p.number} {p.label!r}" for p in parts) or "none"
    raise FileNotFoundError(f"{disk}: no partition labelled {' or '.join(labels)} "
                            f"(partitions: {found})")


def _boot(disk: Path) -> Partition:
    from hil.flash.partitions import read_partitions

    number = partition(disk, "resin-boot", "balena-boot").number
    return next(p for p in read_partitions(disk)[1] if p.number == number)


def read_boot_file(disk: Path, name: str) -> bytes | None:
    from hil.flash import fat

    return fat.read_file(disk, _boot(disk), name)


def boot_state(disk: Path, bootloader: str) -> parse.BootState:
    """The bootloader variables as stored on the boot partition of ``disk``."""
    env: dict[str, str] = {}
    if bootloader == "grub":
        for name in GRUB_FILES:
            raw = read_boot_file(disk, name)
            if raw is not None:
                env = parse.env_file(raw)
                break
    else:
        for name in UBOOT_FILES:
            raw = read_boot_file(disk, name)
            if raw is not None:
                env.update(parse.env_file(raw))
    return parse.boot_state(env)


def write_boot_file(disk: Path, name: str, data: bytes) -> None:
    import time

    from hil.flash import fat

    fat.write_files(disk, _boot(disk), {name: data}, epoch=int(time.time()))


def _copy_range(src: Path, offset: int, size: int, dst: Path) -> None:
    """Copy bytes [offset, offset+size) of ``src`` to ``dst``, keeping holes as holes."""
    with src.open("rb") as fi, dst.open("wb") as fo:
        fo.truncate(size)
        fd = fi.fileno()
        pos = offset
        end = offset + size
        while pos < end:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # only a hole is left
                break
            if data_at >= end:
                break
            hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), end)
            fi.seek(data_at)
            fo.seek(data_at - offset)
            left = hole_at - data_at
            while left > 0:
                chunk = fi.read(min(left, 4 << 20))
                if not chunk:
                    break
                fo.write(chunk)
                left -= len(chunk)
            pos = hole_at


def fsck(disk: Path, label: str = "resin-data", *, workdir: Path | None = None) -> FsCheck:
    """Check the ext4 partition ``label`` of a powered-off board's disk: replay its journal
    on a copy, as the kernel does when it mounts the partition, then run a full read-only
    check. Clean means e2fsck found nothing to fix."""
    e2fsck = shutil.which("e2fsck") or shutil.which("e2fsck", path="/sbin:/usr/sbin")
    if e2fsck is None:
        raise FileNotFoundError("e2fsck is not installed on the rig host (package e2fsprogs)")
    part = partition(disk, label)
    with tempfile.TemporaryDirectory(prefix="hil-fsck-", dir=workdir) as tmp:
        copy = Path(tmp) / f"{label}.img"
        _copy_range(disk, part.offset, part.size, copy)
        replay = subprocess.run([e2fsck, "-E", "journal_only", "-y", str(copy)],
                                capture_output=True, text=True, timeout=300, check=False)
        replayed = "recovering journal" in (replay.stdout + replay.stderr)
        if replay.returncode > 1:
            return FsCheck(False, replayed, replay.stdout + replay.stderr)
        check = subprocess.run([e2fsck, "-f", "-n", str(copy)], capture_output=True,
                               text=True, timeout=600, check=False)
        out = (replay.stdout + replay.stderr + check.stdout + check.stderr).strip()
        return FsCheck(check.returncode == 0, replayed, out)
