"""Host-side access to a reference OS disk image file: configure it before the first boot
(balena's "os configure") and read the bootloader state after a power-off."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hil.errors import HilError
from hil.flash import fat
from hil.flash.partitions import Partition, read_partitions
from hil.redact import secret_values
from hil.refos.builder import EPOCH


class ImageError(HilError):
    """The disk image file does not look like a reference OS image."""


def _boot(disk: Path) -> Partition:
    for part in read_partitions(disk)[1]:
        if part.number == 1:
            if part.name != "resin-boot":
                raise ImageError(f"{disk}: partition 1 is {part.name!r}, not resin-boot")
            return part
    raise ImageError(f"{disk}: no partition 1 (resin-boot)")


def read_boot_file(disk: Path, name: str) -> bytes | None:
    """A file from resin-boot, or None if it does not exist."""
    return fat.read_file(disk, _boot(disk), name)


def write_boot_file(disk: Path, name: str, data: bytes, *, secrets: Sequence[str] = ()) -> None:
    """Create or replace a file on resin-boot; ``secrets`` are masked in errors."""
    fat.write_files(disk, _boot(disk), {name: data}, epoch=EPOCH, secrets=secrets)


def configure(disk: Path, config: Mapping[str, Any], *, replace: bool = False) -> dict[str, Any]:
    """Write config.json into the image's resin-boot. By default the keys are merged over the
    image's own config.json (which carries deviceType); returns what was written."""
    current: dict[str, Any] = {}
    if not replace:
        raw = read_boot_file(disk, "config.json")
        if raw:
            current = json.loads(raw)
    current.update(config)
    write_boot_file(disk, "config.json", (json.dumps(current, indent=1) + "\n").encode(),
                    secrets=secret_values(current))
    return current


def _parse_env(raw: bytes | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (raw or b"").replace(b"\0", b"\n").decode(errors="replace").splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip()
    return env


def boot_env(disk: Path) -> dict[str, str]:
    """The bootloader state (resin_root_part, upgrade_available, bootcount) as the bootloader
    will read it: U-Boot's two files or GRUB's grubenv, with the bootloader's defaults."""
    env = {"resin_root_part": "2", "upgrade_available": "0", "bootcount": "0"}
    grubenv = read_boot_file(disk, "grub/grubenv")
    if grubenv is not None:
        env.update(_parse_env(grubenv))
    else:
        env.update(_parse_env(read_boot_file(disk, "resinOS_uEnv.txt")))
        env.update(_parse_env(read_boot_file(disk, "bootcount.env")))
    return {k: env[k] for k in ("resin_root_part", "upgrade_available", "bootcount")}
