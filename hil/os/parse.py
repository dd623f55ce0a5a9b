"""Pure parsers for what a balenaOS device prints: os-release, bootloader environment files,
``findmnt`` output, the bootloader's console lines, and the records a power-cut writer leaves.
No device access here, so all of it is unit-tested on plain text."""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- os-release -----------------------------------------------------------------------------


def os_release(text: str) -> dict[str, str]:
    """``/etc/os-release`` (shell-style ``KEY=value``, values optionally quoted)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if raw.strip()[len(key) + 1] == '"':  # only double quotes know escapes
                value = re.sub(r"\\([\\$\"`])", r"\1", value)
        out[key.strip()] = value
    return out


# --- bootloader state -----------------------------------------------------------------------

BOOT_VARS = ("resin_root_part", "upgrade_available", "bootcount")


@dataclass(frozen=True)
class BootState:
    """The three variables balenaOS's bootloaders act on. ``resin_root_part`` is the partition
    number the bootloader is told to boot; while ``upgrade_available`` is 1 each boot counts."""

    resin_root_part: int
    upgrade_available: int
    bootcount: int

    def __str__(self) -> str:
        return (f"resin_root_part={self.resin_root_part} "
                f"upgrade_available={self.upgrade_available} bootcount={self.bootcount}")


def env_file(raw: bytes | str) -> dict[str, str]:
    """A bootloader environment file: U-Boot ``env export -t`` text (may end in NUL bytes),
    balenaOS's ``resinOS_uEnv.txt``/``bootcount.env``, or a 1024-byte GRUB environment block
    (``#`` padding, comment header). Later assignments win, as for the bootloaders."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    env: dict[str, str] = {}
    for line in text.replace("\0", "\n").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            env[key.strip()] = value.strip()
    return env


class BootEnvError(ValueError):
    """A bootloader variable has a value the bootloader would not accept as a number."""


def boot_state(env: dict[str, str],
               defaults: tuple[int, int, int] = (2, 0, 0)) -> BootState:
    """BootState from merged environment files; missing variables take the bootloaders'
    defaults (root partition 2, no upgrade, count 0), as both boot scripts do."""
    values = []
    for name, default in zip(BOOT_VARS, defaults, strict=True):
        raw = env.get(name, "")
        if raw == "":
            values.append(default)
            continue
        try:
            # U-Boot scripts may store hex (setexpr); plain decimal is what balenaOS writes
            values.append(int(raw, 16) if raw.lower().startswith("0x") else int(raw))
        except ValueError:
            raise BootEnvError(f"{name}={raw!r} is not a number") from None
    return BootState(*values)


# The reference OS's bootloaders print their decision once per boot (U-Boot script / grub.cfg).
BOOT_LINE = re.compile(rb"HIL-BOOT: root=(\d+) resin_root_part=(\d+) bootcount=(\d+) "
                       rb"upgrade_available=(\d+)")


@dataclass(frozen=True)
class BootLine:
    """What the bootloader printed for one boot: the root it chose and the state it acted on
    (``bootcount`` already incremented for this boot)."""

    root: int
    state: BootState


def boot_line(match_groups: tuple[bytes | None, ...]) -> BootLine:
    root, part, count, upgrade = (int(g or b"0") for g in match_groups[:4])
    return BootLine(root, BootState(part, upgrade, count))


def boot_lines(console: bytes) -> list[BootLine]:
    return [boot_line(m.groups()) for m in BOOT_LINE.finditer(console)]


# --- mounts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape_findmnt(value: str) -> str:
    # findmnt -r escapes unsafe characters as \xNN
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def findmnt(text: str) -> list[Mount]:
    """``findmnt -rn -o SOURCE,TARGET,FSTYPE,OPTIONS`` output. A bind mount's SOURCE is
    ``/dev/xxx[/subdir]``."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        opts = fields[3] if len(fields) > 3 else ""
        mounts.append(Mount(_unescape_findmnt(fields[0]), _unescape_findmnt(fields[1]),
                            fields[2], tuple(o for o in opts.split(",") if o)))
    return mounts


def proc_mounts(text: str) -> list[Mount]:
    """``/proc/mounts`` (octal escapes ``\\040``)."""
    def unesc(v: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), v)

    mounts = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4:
            mounts.append(Mount(unesc(f[0]), unesc(f[1]), f[2], tuple(f[3].split(","))))
    return mounts


def mount_at(mounts: list[Mount], target: str) -> Mount | None:
    """The mount that is visible at ``target`` (the last one mounted there)."""
    found = None
    for m in mounts:
        if m.target == target:
            found = m
    return found


def partition_number(device: str) -> int | None:
    """3 for /dev/vda3, /dev/sda3, /dev/mmcblk0p3, /dev/nvme0n1p3; None for a whole disk."""
    name = device.rsplit("/", 1)[-1]
    m = re.fullmatch(r"(?:mmcblk\d+|nvme\d+n\d+|loop\d+|md\d+)p(\d+)", name)
    if m is None:
        m = re.fullmatch(r"(?:[sv]|xv|h)d[a-z]+(\d+)", name)
    return int(m.group(1)) if m else None


# --- power-cut records ----------------------------------------------------------------------

RECORD_SIZE = 64  # bytes per record, newline included


def record(n: int) -> bytes:
    """Record ``n`` as the writer appends it: fixed width, so a torn one is recognisable."""
    head = f"{n:08d} "
    return (head + "hil-record-" + "x" * (RECORD_SIZE - len(head) - 12) + "\n").encode()


@dataclass(frozen=True)
class RecordCheck:
    complete: int  # records 1..complete are present, intact and in order
    tail: str  # what follows them, described ("nothing", "a torn record 12", ...)
    problem: str | None  # set when something other than a clean prefix of the series is there


def check_records(data: bytes) -> RecordCheck:
    """How much of the series record(1), record(2), ... ``data`` holds. Beyond the complete
    records only a torn copy of the next one (a prefix of it) is expected after a power cut;
    zeros there are reported as such (the OS promises nothing past the last fsync)."""
    n = 0
    pos = 0
    while pos + RECORD_SIZE <= len(data):
        want = record(n + 1)
        if data[pos:pos + RECORD_SIZE] != want:
            break
        n += 1
        pos += RECORD_SIZE
    rest = data[pos:]
    if not rest:
        return RecordCheck(n, "nothing", None)
    nxt = record(n + 1)
    if nxt.startswith(rest):
        return RecordCheck(n, f"a torn record {n + 1} ({len(rest)} of {RECORD_SIZE} bytes)", None)
    if rest.strip(b"\0") == b"":
        return RecordCheck(n, f"{len(rest)} zero bytes", None)
    bad = rest[:RECORD_SIZE]
    return RecordCheck(n, f"{len(rest)} bytes", f"after record {n} the file holds {bad!r}"
                       f" where record {n + 1} or nothing belongs")


ACK_LINE = re.compile(rb"HIL-ACK ([0-9a-f]+) (\d+)")


def acknowledged(console: bytes, token: str) -> int:
    """The highest record number the writer with ``token`` printed (0 if none). The writer
    prints a number only after the record's fsync returned."""
    best = 0
    for m in ACK_LINE.finditer(console):
        if m.group(1).decode() == token:
            best = max(best, int(m.group(2)))
    return best
