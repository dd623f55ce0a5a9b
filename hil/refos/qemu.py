"""The QEMU board the reference OS is built and tested for: the target of the qemu-aarch64 and
qemu-x86_64 rigs, with its command line from hil.qemu.target (the one place it is made), its
console on a chardev of the caller's choice and its disk file written directly."""

from __future__ import annotations

from pathlib import Path

from hil.qemu.target import QemuSettings, board_firmware, disk_drive, qemu_command

ARCHES = ("aarch64", "x86_64")


def board_settings(arch: str) -> QemuSettings:
    """The ``target:`` of rigs/qemu-<arch>.yaml (tests/refos/test_build.py holds them equal)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHES)}")
    return QemuSettings(memory=512, devices=["i6300esb"])


def qemu_argv(arch: str, disk: Path, *, ssh_port: int | None = None, serial: str = "stdio",
              uboot_env: Path | None = None) -> list[str]:
    """argv booting ``disk`` on the qemu-<arch> rig's board: U-Boot (aarch64) or SeaBIOS + the
    disk's GRUB (x86_64). ``ssh_port`` forwards 127.0.0.1:<port> to the guest's SSH (22222).
    ``serial`` is a QEMU chardev spec for the console
    (``stdio``, ``unix:PATH,server=on,wait=off``, ``pty``). ``uboot_env`` (aarch64) is the
    image's RefosImage.uboot_env, attached as the second pflash bank: U-Boot runs boot.scr at
    once instead of its distro boot's scan."""
    settings = board_settings(arch)
    extra: list[str] = []
    if uboot_env is not None:
        extra += ["-drive", f"if=pflash,unit=1,format=raw,readonly=on,file={uboot_env}"]
    settings = settings.model_copy(update={"extra_args": [*settings.extra_args, *extra]})
    return qemu_command(settings, arch, binary=f"qemu-system-{arch}",
                        firmware=board_firmware(settings, arch), drive=disk_drive(disk, "disk0"),
                        console=["-serial", serial], ssh_port=ssh_port)
