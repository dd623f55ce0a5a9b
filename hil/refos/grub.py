"""GRUB (i386-pc, booted by SeaBIOS) for the x86_64 image, installed without grub-install:
core.img goes into the bios_grub partition, boot.img's code into the MBR, with the two sector
pointers grub-bios-setup would patch."""

from __future__ import annotations

import struct
from pathlib import Path

from hil.refos import fs

FILES = Path(__file__).parent / "files" / "grub"
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
MODULES = ("biosdisk", "part_gpt", "fat", "ext2", "normal", "configfile", "loadenv", "test",
           "echo", "linux", "serial", "terminal", "boot", "gzio", "halt", "sleep")


def grubenv(**values: str) -> bytes:
    """A 1024-byte GRUB environment block."""
    body = "# GRUB Environment Block\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    return (body + "#" * (1024 - len(body))).encode()


def boot_files(console: str) -> dict[str, bytes]:
    cfg = (FILES / "grub.cfg").read_text().replace("@CONSOLE@", console)
    return {"grub/grub.cfg": cfg.encode(),
            "grub/grubenv": grubenv(resin_root_part="2", upgrade_available="0",
                                    bootcount="0"),
            # the OS's bootloader_config_modify fills it (extra kernel arguments)
            "grub/grub_extraenv": grubenv()}


def install(disk: Path, *, core_offset: int, core_size: int, work: Path) -> None:
    core_img = work / "core.img"
    fs.run(["grub-mkimage", "-O", "i386-pc", "-o", str(core_img), "-p", "(hd0,gpt1)/grub",
            "-d", str(GRUB_DIR), *MODULES])
    core = bytearray(core_img.read_bytes())
    boot = bytearray((GRUB_DIR / "boot.img").read_bytes())
    if len(core) > core_size:
        raise fs.ImageBuildError(f"core.img ({len(core)} bytes) exceeds bios_grub")
    lba = core_offset // 512
    struct.pack_into("<Q", boot, 0x5C, lba)  # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    boot[0x66:0x68] = b"\x90\x90"  # skip the drive check, as grub-bios-setup does for disks
    struct.pack_into("<Q", core, 0x200 - 12, lba + 1)  # diskboot's blocklist start
    with disk.open("r+b") as f:
        f.seek(0)
        f.write(boot[:440])  # MBR code only: the protective MBR's table stays
        f.seek(core_offset)
        f.write(core)
