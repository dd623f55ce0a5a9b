"""The QEMU command line the reference OS is built and tested for (TCG only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hil.qemu import TB_SIZE_MIB
from hil.qemu.firmware import UBOOT_ARM64


def qemu_argv(arch: str, disk: Path, *, ssh_port: int | None = None,
              extra_drives: Sequence[Path] = (), serial: str = "stdio",
              memory_mib: int = 512, uboot_env: Path | None = None) -> list[str]:
    """argv for booting ``disk`` like a board boots its SD card or disk: U-Boot (aarch64) or
    SeaBIOS + the disk's GRUB (x86_64). ``ssh_port`` forwards 127.0.0.1:<port> to the guest's
    SSH (22222). ``extra_drives`` are attached read-only after the disk (/dev/vdb, ...), e.g. a
    rootfs image for ``hostapp-update -f /dev/vdb``. ``serial`` is a QEMU chardev spec for the
    console (``stdio``, ``unix:PATH,server=on,wait=off``, ``pty``). ``uboot_env`` (aarch64) is
    the image's RefosImage.uboot_env, attached as the second pflash bank: no autoboot delay."""
    fwd = f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22222" if ssh_port else ""
    common = [
        "-m", str(memory_mib), "-smp", "1", "-accel", f"tcg,tb-size={TB_SIZE_MIB}",
        "-display", "none", "-monitor", "none", "-serial", serial,
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
    ]
    for extra in extra_drives:
        common += ["-drive", f"file={extra},format=raw,if=virtio,readonly=on"]
    common += ["-netdev", f"user,id=net0{fwd}"]
    if arch == "aarch64":
        flash = ["-drive", f"if=pflash,unit=1,format=raw,readonly=on,file={uboot_env}"
                 ] if uboot_env else []
        return ["qemu-system-aarch64", "-M", "virt,acpi=off", "-cpu", "cortex-a53",
                "-bios", str(UBOOT_ARM64), *flash, *common,
                "-device", "virtio-net-pci,netdev=net0", "-device", "i6300esb"]
    if arch == "x86_64":
        # romfile= skips iPXE: SeaBIOS then boots the disk without probing the network
        return ["qemu-system-x86_64", "-M", "pc", "-cpu", "qemu64", *common,
                "-device", "virtio-net-pci,netdev=net0,romfile=", "-device", "i6300esb",
                "-boot", "c"]
    raise ValueError(f"unknown arch {arch!r}")
