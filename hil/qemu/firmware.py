"""The firmware a QEMU board boots when its rig file names none: Debian's U-Boot for aarch64
(package u-boot-qemu), SeaBIOS (built into QEMU) for x86_64.

U-Boot counts down ``bootdelay`` seconds (2 in Debian's build) before it autoboots. Labs set
their boards' delay to 0; a QEMU board has no saved environment to set, so the rig boots a copy
of U-Boot whose built-in default says ``bootdelay=<rig's value>``: about 2 s less per boot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from hil.cache import cache_dir

log = logging.getLogger(__name__)

UBOOT_ARM64 = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")

# one entry of U-Boot's built-in default environment: NUL-separated "name=value" strings
_BOOTDELAY = re.compile(rb"\0bootdelay=(-?[0-9]+)\0")


def default_firmware(arch: str, *, bootdelay: int | None) -> Path | None:
    """The ``-bios`` file for ``arch`` (None: QEMU's own), with U-Boot's autoboot delay set to
    ``bootdelay`` (None: as built)."""
    if arch != "aarch64":
        return None
    if bootdelay is None or not UBOOT_ARM64.is_file():  # the caller reports a missing file
        return UBOOT_ARM64
    return uboot_with_bootdelay(UBOOT_ARM64, bootdelay)


def uboot_with_bootdelay(uboot: Path, bootdelay: int) -> Path:
    """A cached copy of ``uboot`` whose default environment has ``bootdelay``; ``uboot`` itself
    if it already has it, or if its environment is not found exactly once (logged)."""
    data = uboot.read_bytes()
    found = list(_BOOTDELAY.finditer(data))
    value = str(bootdelay).encode()
    if len(found) != 1 or len(found[0].group(1)) != len(value):
        # the length must stay: code and data after it sit at fixed offsets
        log.warning("%s: cannot set its bootdelay to %d (its default environment was not found "
                    "once with a value as long); it keeps its own", uboot, bootdelay)
        return uboot
    if found[0].group(1) == value:
        return uboot
    start = found[0].start(1)
    patched = data[:start] + value + data[start + len(value):]
    digest = hashlib.sha256(data).hexdigest()[:16]
    out = cache_dir("firmware") / f"{uboot.stem}-{digest}-bootdelay{bootdelay}{uboot.suffix}"
    if not out.is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_bytes(patched)
        tmp.chmod(0o644)  # libvirt's QEMU may run as another user
        os.replace(tmp, out)  # atomic: concurrent sessions write the same bytes
    return out
