"""udev: find devices by their properties and wait for block devices to appear.

A rig file names hardware by what survives re-plugging: udev properties (``ID_SERIAL_SHORT``,
``ID_PATH``) or sysfs attributes written the way udev rules write them: ``ATTR{size}`` (the
device itself) and ``ATTRS{serial}`` (the device or any parent, e.g. the USB device above a
tty). Values are shell globs (``*``, ``?``, ``[...]``).

Without udevd (containers, minimal CI hosts) there are no ``ID_*`` properties and no
``/dev/disk/by-id`` links; ``ATTR``/``ATTRS`` matches still work there, because they read
sysfs, and the events come straight from the kernel's netlink socket.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hil.deadline import Deadline
from hil.errors import InfraError

_ATTR = re.compile(r"^(ATTRS?)\{([^}]+)\}$")


def udevd_running() -> bool:
    """udevd publishes its control socket here; without it, events come from the kernel."""
    return Path("/run/udev/control").exists()


def _context() -> Any:
    try:
        import pyudev
    except ImportError as exc:  # a declared dependency, but say what is missing
        raise InfraError(f"pyudev is not installed ({exc})", part="udev") from None
    return pyudev.Context()


def _attr(device: Any, name: str) -> str | None:
    try:
        value = device.attributes.get(name)
    except (OSError, UnicodeDecodeError):  # unreadable attributes (permissions, binary)
        return None
    if value is None:
        return None
    return bytes(value).decode(errors="replace").strip()


def _glob(value: str | None, pattern: str) -> bool:
    return value is not None and fnmatch.fnmatchcase(value, pattern)


def matches(device: Any, match: Mapping[str, str]) -> bool:
    """True if the pyudev device has every property/attribute in ``match``."""
    for key, pattern in match.items():
        m = _ATTR.match(key)
        if m is None:
            if not _glob(device.properties.get(key), pattern):
                return False
        elif m.group(1) == "ATTR":
            if not _glob(_attr(device, m.group(2)), pattern):
                return False
        else:
            node = device
            while node is not None and not _glob(_attr(node, m.group(2)), pattern):
                node = node.parent
            if node is None:
                return False
    return True


def find_devices(subsystem: str, match: Mapping[str, str]) -> list[Any]:
    """pyudev devices of ``subsystem`` matching ``match``, sorted by node name."""
    ctx = _context()
    found = [d for d in ctx.list_devices(subsystem=subsystem) if matches(d, match)]
    return sorted(found, key=lambda d: d.device_node or d.sys_path)


def find_node(subsystem: str, match: Mapping[str, str], *, part: str, rig: str) -> str:
    """The one /dev node of ``subsystem`` matching ``match`` (e.g. a relay board's tty)."""
    nodes = [d.device_node for d in find_devices(subsystem, match) if d.device_node]
    if len(nodes) != 1:
        hint = "" if udevd_running() or not any(not _ATTR.match(k) for k in match) else (
            "; udevd is not running, so only kernel properties and ATTR{}/ATTRS{} can match")
        raise InfraError(f"expected one {subsystem} device matching {dict(match)}, found "
                         f"{', '.join(nodes) or 'none'}{hint}", part=part, rig=rig)
    return str(nodes[0])


# --- block devices ------------------------------------------------------------------------

def block_size(device: Any) -> int:
    """Size in bytes; 0 for a card reader without a card or a detached loop device."""
    sectors = _attr(device, "size")
    return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def _present_block(device_path: Path | None, match: Mapping[str, str] | None) -> list[Path]:
    """Block devices that are there now (node exists and has media)."""
    if device_path is not None:
        try:
            real = device_path.resolve(strict=True)
            if not stat.S_ISBLK(os.stat(real).st_mode):
                return []
        except OSError:
            return []
        sysfs = Path("/sys/class/block") / real.name / "size"
        try:
            return [real] if int(sysfs.read_text().strip()) > 0 else []
        except (OSError, ValueError):
            return [real]  # a block node without sysfs entry (unusual): trust the node
    assert match is not None
    full = dict(match)
    full.setdefault("DEVTYPE", "disk")  # whole disks: images are written to the disk
    return [Path(d.device_node) for d in find_devices("block", full)
            if d.device_node and block_size(d) > 0 and Path(d.device_node).exists()]


def _seen_block() -> str:
    ctx = _context()
    seen = [f"{Path(d.device_node).name} ({block_size(d) // 2**20} MiB)"
            for d in ctx.list_devices(subsystem="block", DEVTYPE="disk") if d.device_node]
    return ", ".join(seen) or "none"


def wait_for_block(device: Path | None, match: dict[str, str] | None, timeout: float,
                   rig: str) -> Path:
    """The block device named by ``device`` (e.g. /dev/disk/by-id/...) or by udev ``match``,
    waited for by udev event (it appears after an SD mux switches to the host).

    The monitor is started before the first look, so a device that appears in between is not
    missed. With udevd the events are udevd's (after it made the /dev/disk/by-id links); without
    it they are the kernel's (platform.md §7).
    """
    if (device is None) == (match is None):
        raise ValueError("give exactly one of device or match")
    import pyudev

    ctx = _context()
    source = "udev" if udevd_running() else "kernel"
    monitor = pyudev.Monitor.from_netlink(ctx, source=source)
    monitor.filter_by("block")
    monitor.start()
    what = str(device) if device is not None else f"a block device matching {match}"
    deadline = Deadline(timeout)
    while True:
        found = _present_block(device, match)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InfraError(f"{len(found)} block devices match {match}: "
                             f"{', '.join(map(str, found))}; make the match narrower "
                             f"(see `hil discover`)", part="storage", rig=rig)
        if deadline.expired():
            hint = ""
            wants_udevd = (device is not None and "/by-" in str(device)) or any(
                k.startswith("ID_") for k in (match or {}))
            if source == "kernel" and wants_udevd:
                hint = ("; udevd is not running, so there are no /dev/disk/by-* links and "
                        "no ID_* properties: match with ATTR{}/ATTRS{} instead")
            raise InfraError(f"{what} did not appear within {timeout:.1f}s after the card "
                             f"was switched to the host; block devices present: "
                             f"{_seen_block()}{hint}", part="storage", rig=rig)
        # any block event may be ours (add, or change when media arrives); re-check all
        monitor.poll(timeout=max(0.01, deadline.remaining()))
