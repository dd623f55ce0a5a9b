"""Partition tables (MBR with logical partitions, GPT) and FAT volume labels, read in pure
Python; a GPT written with sfdisk (``write_gpt``, for the images we build).

Enough to find a balenaOS boot partition (``resin-boot``/``balena-boot``: the GPT partition name
or the FAT label) inside an image file without loop devices, root or kernel partition support.
"""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hil.errors import ConfigError, InfraError

EXTENDED_TYPES = {0x05, 0x0F, 0x85}


@dataclass(frozen=True)
class Partition:
    number: int  # as Linux numbers them: 1-4 primary, 5+ logical, GPT in table order
    start: int  # bytes from the start of the image
    size: int  # bytes
    type: str  # MBR "0x0c" or GPT type GUID
    name: str = ""  # GPT partition name
    fs_type: str = ""  # "FAT12"/"FAT16"/"FAT32" if a FAT boot sector is there
    fs_label: str = ""  # FAT volume label (root directory entry, else the boot sector)

    def describe(self) -> str:
        bits = [f"p{self.number}", f"type {self.type}", f"{self.size >> 20} MiB"]
        if self.name:
            bits.append(f"name {self.name!r}")
        if self.fs_type:
            bits.append(f"{self.fs_type} label {self.fs_label!r}")
        return " ".join(bits)


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08X}-{b:04X}-{c:04X}-{raw[8:10].hex().upper()}-{raw[10:16].hex().upper()}"


def _pread(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)


def _gpt(fd: int, sector: int, image: Path) -> list[Partition] | None:
    header = _pread(fd, 92, sector)
    if header[:8] != b"EFI PART":
        return None
    size = struct.unpack_from("<I", header, 12)[0]
    header = _pread(fd, size, sector)
    crc = struct.unpack_from("<I", header, 16)[0]
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:size]) != crc:
        raise ConfigError(f"GPT header at byte {sector} has a bad CRC", file=str(image))
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    table = _pread(fd, count * entry_size, entries_lba * sector)
    if zlib.crc32(table) != entries_crc:
        raise ConfigError("GPT partition entries have a bad CRC", file=str(image))
    parts = []
    for i in range(count):
        entry = table[i * entry_size:(i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(i + 1, first * sector, (last - first + 1) * sector,
                               _guid(entry[:16]), name))
    return parts


def _mbr_entries(sector0: bytes) -> list[tuple[int, int, int]]:
    """(type, start LBA, sectors) of the four slots, empty ones included."""
    return [struct.unpack_from("<4xB3xII", sector0, 446 + 16 * i) for i in range(4)]


def _mbr(fd: int, image: Path, sector0: bytes) -> list[Partition]:
    parts = []
    for i, (ptype, lba, count) in enumerate(_mbr_entries(sector0)):
        if not ptype or not count:
            continue
        if ptype in EXTENDED_TYPES:
            parts += _logical(fd, image, lba)
        else:
            parts.append(Partition(i + 1, lba * 512, count * 512, f"0x{ptype:02x}"))
    return parts


def _logical(fd: int, image: Path, ext_lba: int) -> list[Partition]:
    """Walk the chain of extended boot records; logical partitions are numbered from 5."""
    parts: list[Partition] = []
    ebr_lba, seen = ext_lba, set()
    while ebr_lba not in seen and len(parts) < 128:
        seen.add(ebr_lba)
        ebr = _pread(fd, 512, ebr_lba * 512)
        if ebr[510:512] != b"\x55\xaa":
            raise ConfigError(f"extended boot record at sector {ebr_lba} has no signature",
                              file=str(image))
        (ptype, rel, count), (ntype, nrel, _n) = _mbr_entries(ebr)[:2]
        if ptype and count:
            parts.append(Partition(5 + len(parts), (ebr_lba + rel) * 512, count * 512,
                                   f"0x{ptype:02x}"))
        if not ntype:
            break
        ebr_lba = ext_lba + nrel
    return parts


def _fat(fd: int, part: Partition) -> Partition:
    """Fill in the FAT type and label if ``part`` holds a FAT filesystem."""
    boot = _pread(fd, 512, part.start)
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
        return part
    bps, _spc, reserved, nfats, root_entries, _tot16, _media, fatsz16 = struct.unpack_from(
        "<HBHBHHBH", boot, 11)
    if bps not in (512, 1024, 2048, 4096) or not nfats:
        return part
    if fatsz16:  # FAT12/16: extended BPB at 36
        sig, label, fstype = boot[38], boot[43:54], boot[54:62]
    else:  # FAT32: extended BPB at 64
        sig, label, fstype = boot[66], boot[71:82], boot[82:90]
    if sig not in (0x28, 0x29) and not fstype.startswith(b"FAT"):
        return part
    kind = fstype.decode("ascii", errors="replace").strip() or "FAT"
    text = label.decode("latin-1").rstrip() if sig == 0x29 else ""
    if fatsz16:  # the root directory's volume entry is what mlabel/blkid use
        root = _pread(fd, root_entries * 32, part.start + (reserved + nfats * fatsz16) * bps)
        for off in range(0, len(root), 32):
            entry = root[off:off + 32]
            if entry[0] == 0:
                break
            if entry[0] != 0xE5 and entry[11] & 0x08 and entry[11] != 0x0F:
                text = entry[:11].decode("latin-1").rstrip()
                break
    return Partition(part.number, part.start, part.size, part.type, part.name, kind,
                     "" if text == "NO NAME" else text)


def read_partitions(image: str | os.PathLike[str], *, name: str | os.PathLike[str] | None = None
                    ) -> tuple[str, list[Partition]]:
    """("gpt" or "mbr", partitions with FAT labels) of a raw disk image. Errors name ``name``
    (the user's file, when ``image`` is its decompressed copy), else ``image``."""
    path = Path(image)
    shown = Path(name) if name is not None else path
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sector0 = _pread(fd, 512, 0)
        if len(sector0) < 512 or sector0[510:512] != b"\x55\xaa":
            raise ConfigError("no partition table (no MBR boot signature 55aa at byte 510)",
                              file=str(shown))
        kind, parts = "gpt", None
        if any(t == 0xEE for t, _s, _n in _mbr_entries(sector0)):
            for sector in (512, 4096):
                parts = _gpt(fd, sector, shown)
                if parts is not None:
                    break
            if parts is None:
                raise ConfigError("protective MBR but no GPT header ('EFI PART')",
                                  file=str(shown))
        else:
            kind, parts = "mbr", _mbr(fd, shown, sector0)
        return kind, [_fat(fd, p) for p in parts]
    finally:
        os.close(fd)


def labelled(image: str | os.PathLike[str], labels: tuple[str, ...], *,
             name: str | os.PathLike[str] | None = None) -> tuple[Partition | None, str]:
    """The partition whose GPT name or FAT label is one of ``labels`` (case-insensitive), or
    None, and what the image holds (for messages). Errors name ``name``, else ``image``."""
    kind, parts = read_partitions(image, name=name)
    wanted = {label.lower() for label in labels}
    found = (f"{kind.upper()} image with " + "; ".join(p.describe() for p in parts)
             if parts else f"{kind.upper()} image with no partitions")
    return next((p for p in parts if p.name.lower() in wanted or p.fs_label.lower() in wanted),
                None), found


def find_partition(image: str | os.PathLike[str], labels: tuple[str, ...], *,
                   name: str | os.PathLike[str] | None = None) -> Partition:
    """The FAT partition whose GPT name or FAT label is one of ``labels`` (case-insensitive).
    Errors name ``name`` (the user's file), else ``image``."""
    shown = str(name if name is not None else image)
    part, found = labelled(image, labels, name=name)
    if part is None:
        raise ConfigError(f"no FAT partition named or labelled {' or '.join(labels)}; "
                          f"found: {found}", file=shown)
    if not part.fs_type:
        raise ConfigError(f"partition {part.describe()} is named like the boot partition "
                          "but holds no FAT filesystem", file=shown)
    return part


@dataclass(frozen=True)
class GptEntry:
    """One partition to create: sizes and offsets in bytes, multiples of 512."""

    name: str
    size: int | None  # None: the rest of the disk
    type_guid: str
    uuid: str
    start: int | None = None  # None: after the previous one
    attrs: str = ""  # sfdisk's names, e.g. "LegacyBIOSBootable"


SFDISK_TIMEOUT = 60.0


def write_gpt(disk: Path, size: int, disk_guid: str, entries: Sequence[GptEntry]
              ) -> list[Partition]:
    """Create ``disk`` (a sparse file of ``size`` bytes) holding a GPT with ``entries``; the
    same bytes for the same arguments. Returns the partitions as ``read_partitions`` sees them.
    """
    disk.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(size)
    lines = ["label: gpt", f"label-id: {disk_guid}", "unit: sectors", "first-lba: 34", ""]
    for e in entries:
        fields = []
        if e.start is not None:
            fields.append(f"start={e.start // 512}")
        if e.size is not None:
            fields.append(f"size={e.size // 512}")
        fields += [f"type={e.type_guid}", f"uuid={e.uuid}", f'name="{e.name}"']
        if e.attrs:
            fields.append(f'attrs="{e.attrs}"')
        lines.append(", ".join(fields))
    try:
        proc = subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
                              input=("\n".join(lines) + "\n").encode(), capture_output=True,
                              timeout=SFDISK_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise InfraError("sfdisk not found: install fdisk", part="flash") from exc
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"sfdisk on {disk} did not end in {SFDISK_TIMEOUT:.0f} s",
                         part="flash") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise InfraError(f"sfdisk could not write the GPT of {disk} ({proc.returncode}): {err}",
                         part="flash")
    return read_partitions(disk)[1]
