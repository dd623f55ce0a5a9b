"""Refuse to flash a target that would destroy something: checked before a single byte is written.

A block device is refused if it (or a partition of it) is mounted, used as swap, holds the host's
root, is held by device-mapper/md (``holders/``), is a partition, is read-only, is not removable
(unless the rig says it is its own disk: ``allow_fixed``), or is smaller than the image. Regular
files (QEMU disks, a virtual SD mux) are allowed, except the image itself, an active swap file, or
the disk of a running QEMU: any target another process holds a byte-range lock on is refused, and
QEMU locks its images that way (``in_use_by``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Literal, NamedTuple

from hil.errors import InfraError

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/class/block")


class Target(NamedTuple):
    given: str  # as the caller named it (maybe a /dev/disk/by-id symlink)
    path: Path  # resolved
    kind: Literal["file", "block"]
    size: int  # bytes: device capacity, or the file's current size (0 if it does not exist)
    name: str = ""  # kernel name: sdb, mmcblk0, loop3
    removable: bool = False
    description: str = ""
    logical_block_size: int = 512
    discard: bool = False
    devnums: frozenset[int] = frozenset()  # the disk and its partitions
    loop_autoclear: bool | None = None  # loop devices: the flag `losetup -d` sets when busy

    def __str__(self) -> str:
        if self.kind == "file":
            return str(self.path)
        shown = str(self.path) if str(self.path) == self.given else f"{self.given} -> {self.path}"
        return f"{shown} ({self.description})" if self.description else shown


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _devnum(text: str) -> int:
    major, minor = text.split(":")
    return os.makedev(int(major), int(minor))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def _refuse(target: str, why: str) -> InfraError:
    return InfraError(f"refusing to write {target}: {why}; nothing was written", part="flash")


def describe_block(sysdir: Path) -> str:
    name = sysdir.name
    if name.startswith("loop"):
        backing = _read(sysdir / "loop" / "backing_file")
        return f"loop device on {backing}" if backing else "unbound loop device"
    words = [_read(sysdir / "device" / "vendor"), _read(sysdir / "device" / "model")]
    return " ".join(w for w in words if w) or name


def resolve_target(target: str | os.PathLike[str]) -> Target:
    """Resolve symlinks and gather what the checks need. Does not refuse anything."""
    given = str(target)
    path = Path(os.path.realpath(given))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if Path(given).is_symlink() or given.startswith("/dev/"):
            raise _refuse(given, "no such device (not plugged in, or the mux is switched to "
                          "the device under test)") from None
        if not path.parent.is_dir():
            raise _refuse(given, f"directory {path.parent} does not exist") from None
        return Target(given, path, "file", 0)
    if stat.S_ISREG(st.st_mode):
        return Target(given, path, "file", st.st_size)
    if not stat.S_ISBLK(st.st_mode):
        raise _refuse(given, "it is neither a block device nor a regular file")
    sysdir = Path(os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:"
                                   f"{os.minor(st.st_rdev)}"))
    if (sysdir / "partition").exists():
        raise _refuse(given, f"{path} is a partition of /dev/{sysdir.parent.name}; "
                      "give the whole disk")
    devnums = {st.st_rdev}
    for child in sysdir.iterdir():
        if (child / "partition").exists():
            devnums.add(_devnum(_read(child / "dev", "0:0")))
    autoclear = None
    if sysdir.name.startswith("loop"):
        autoclear = _read(sysdir / "loop" / "autoclear", "0") == "1"
    size = int(_read(sysdir / "size", "0")) * 512  # sysfs counts 512-byte sectors always
    return Target(
        given, path, "block", size, name=sysdir.name,
        removable=_read(sysdir / "removable") == "1",
        description=f"{describe_block(sysdir)}, {_human(size)}",
        logical_block_size=int(_read(sysdir / "queue" / "logical_block_size", "512")),
        discard=int(_read(sysdir / "queue" / "discard_max_bytes", "0")) > 0,
        devnums=frozenset(devnums), loop_autoclear=autoclear)


def _unescape(field_: str) -> str:
    # /proc/self/mountinfo and /proc/swaps escape space, tab, newline and backslash as \ooo
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def _rdev(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def mounts_of(devnums: frozenset[int]) -> list[str]:
    """Mount points whose filesystem lives on one of ``devnums`` (by number or by source)."""
    found = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        source = _unescape(rfields[1])
        if _devnum(fields[2]) in devnums or (source.startswith("/") and
                                             _rdev(source) in devnums):
            found.append(f"{_unescape(fields[4])} ({source})")
    return found


def swaps_on(devnums: frozenset[int]) -> list[str]:
    found = []
    for line in _read(Path("/proc/swaps")).splitlines()[1:]:
        name = _unescape(line.split()[0]) if line.split() else ""
        try:
            st = os.stat(name)
        except OSError:
            continue
        if (st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev) in devnums:
            found.append(name)
    return found


def holders_of(name: str) -> list[str]:
    """device-mapper, md or bcache devices stacked on the disk or one of its partitions."""
    sysdir = SYS_BLOCK / name
    dirs = [sysdir] + [c for c in sysdir.iterdir() if (c / "partition").exists()]
    return sorted({h.name for d in dirs if (d / "holders").is_dir()
                   for h in (d / "holders").iterdir()})


def check_target(target: str | os.PathLike[str], *, image_size: int | None,
                 allow_fixed: bool = False, source: str | os.PathLike[str] | None = None
                 ) -> Target:
    """Resolve ``target`` and refuse it if writing could harm the host; logs the resolution."""
    t = resolve_target(target)
    if t.kind == "file":
        _check_file(t, source)
        return t
    if t.given != str(t.path):
        log.info("flash target %s resolves to %s (%s)", t.given, t.path, t.description)
    else:
        log.info("flash target %s (%s)", t.path, t.description)
    if t.size == 0:
        raise _refuse(t.given, f"{t.path} has no medium (size 0)")
    if os.stat("/").st_dev in t.devnums:
        raise _refuse(t.given, f"{t.path} holds the host's root filesystem")
    mounted = mounts_of(t.devnums)
    if mounted:
        raise _refuse(t.given, f"{t.path} is mounted at {', '.join(mounted)}")
    swaps = swaps_on(t.devnums)
    if swaps:
        raise _refuse(t.given, f"{t.path} is in use as swap ({', '.join(swaps)})")
    holders = holders_of(t.name)
    if holders:
        raise _refuse(t.given, f"{t.path} is held by {', '.join(holders)} (device-mapper, "
                      "LVM, RAID or dm-crypt)")
    if _read(SYS_BLOCK / t.name / "ro") == "1":
        raise _refuse(t.given, f"{t.path} is read-only (write-protect switch?)")
    if not t.removable and not allow_fixed:
        raise _refuse(t.given, f"{t.path} is not a removable disk; if it is the rig's own "
                      "disk, say so (rig file: fixed: true, or --allow-fixed)")
    if image_size is not None and image_size > t.size:
        image = f"the image {source}" if source is not None else "the image"
        raise _refuse(t.given, f"{t.path} holds {t.size} bytes ({_human(t.size)}) but {image} "
                      f"needs {image_size} bytes ({_human(image_size)})")
    _check_unlocked(t)
    return t


def _check_file(t: Target, source: str | os.PathLike[str] | None) -> None:
    if t.size and source is not None:
        a, b = os.stat(t.path), os.stat(source)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            raise _refuse(t.given, "it is the image being flashed")
    if t.size and str(t.path) in {_unescape(line.split()[0]) for line in
                                  _read(Path("/proc/swaps")).splitlines()[1:] if line.split()}:
        raise _refuse(t.given, "it is an active swap file")
    if t.path.exists():
        _check_unlocked(t)


# struct flock (flock64 on 32-bit ABIs): l_type, l_whence, l_start, l_len, l_pid
_FLOCK = struct.Struct("hhqqi")


def lock_conflict(fd: int) -> int | None:
    """Is there a byte-range lock on ``fd``'s file that a whole-file write lock would conflict
    with? Returns the holder's pid, 0 if the kernel does not say (OFD locks), None if free."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0) + bytes(16)  # + room for padding
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
    l_type, _whence, _start, _len, pid = _FLOCK.unpack_from(got)
    return None if l_type == fcntl.F_UNLCK else max(pid, 0)


def lock_holders(path: Path) -> list[str]:
    """Each process with a lock on ``path``, as "pid N (program)": the ``lock:`` lines of
    /proc/PID/fdinfo/FD name the inode as /proc/locks does (major:minor:inode, hex:hex:dec)."""
    st = os.stat(path)
    key = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:  # gone, or not ours to see
            continue
        for fd in fds:
            info = _read(Path(f"/proc/{pid}/fdinfo/{fd}"))
            if any(line.startswith("lock:") and key in line for line in info.splitlines()):
                found.append(_process(int(pid)))
                break
    return found


def _process(pid: int) -> str:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        argv0 = b""
    name = os.path.basename(argv0.decode(errors="replace")) or _read(Path(f"/proc/{pid}/comm"))
    return f"pid {pid} ({name})" if name else f"pid {pid}"


def in_use_by(t: Target) -> str | None:
    """Who holds a byte-range lock on the target, or None. A running QEMU holds OFD locks on
    its disk images (bytes 100+ for the permissions it uses, 200+ for those it does not share),
    and it writes through them without noticing what else changed the file."""
    try:
        fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:  # e.g. no medium: other checks speak for that
        return None
    try:
        pid = lock_conflict(fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):  # no locks here
            return None
        raise
    finally:
        os.close(fd)
    if pid is None:
        return None
    holders = [_process(pid)] if pid else lock_holders(t.path)
    return ", ".join(holders) or "another process (pid not visible)"


def _check_unlocked(t: Target) -> None:
    holder = in_use_by(t)
    if holder:
        raise _refuse(t.given, f"it is in use: {holder} holds a lock on {t.path} (a running "
                      "QEMU locks its disk images); stop it first")


class Presence:
    """Cheap "is the target still there?" for every chunk: unplugged (sysfs node gone), loop
    device detached (the kernel defers ``losetup -d`` while we hold it open, but sets
    ``autoclear``), file deleted. Keeps sysfs files open so a check is one pread."""

    def __init__(self, t: Target, fd: int) -> None:
        self.t, self.fd = t, fd
        self._sys = ""
        self._autoclear = -1
        if t.kind == "block":
            st = os.fstat(fd)
            self._sys = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if t.loop_autoclear is False:
                with contextlib.suppress(OSError):
                    self._autoclear = os.open(f"{self._sys}/loop/autoclear", os.O_RDONLY)

    def gone(self) -> str | None:
        """Why the target is gone, or None."""
        if self.t.kind == "file":
            return "the file was deleted" if os.fstat(self.fd).st_nlink == 0 else None
        if self._autoclear >= 0:
            try:
                if os.pread(self._autoclear, 8, 0).strip() == b"1":
                    return "the loop device was detached (losetup -d) while being written"
            except OSError:
                return "the loop device was detached"
        if not os.path.exists(self._sys):
            return "the device disappeared (unplugged?)"
        return None

    def close(self) -> None:
        if self._autoclear >= 0:
            os.close(self._autoclear)
            self._autoclear = -1


def vanished(t: Target, fd: int) -> str | None:
    """One-off form of ``Presence.gone`` (for error paths)."""
    presence = Presence(t, fd)
    try:
        return presence.gone()
    finally:
        presence.close()
