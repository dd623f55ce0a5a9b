"""A board porter's own aarch64 image, as the framework never built one for its suites: not
balena-shaped. One ext4 partition (``porter-root``) holds everything: Debian's kernel, the
reference OS's initramfs (it mounts ``root=`` and runs ``init=``), and
``boot/extlinux/extlinux.conf``, which U-Boot's distro boot finds by itself. Busybox init
starts a getty on the serial console, and root logs in with a password (its hash in
/etc/shadow, checked by busybox login). Made from Debian packages with the reference OS
builder's pieces; every byte but the password's hash depends only on the packages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from hil.flash.partitions import GptEntry, write_gpt
from hil.refos import debs, fs
from hil.refos.builder import (
    EPOCH,
    GPT_LINUX,
    MiB,
    initramfs,
    library_packages,
)

ARCH = "arm64"
TRIPLET = "aarch64-linux-gnu"
LABEL = "porter-root"
ROOT_START = 1 * MiB
ROOT_SIZE = 112 * MiB
DISK_SIZE = ROOT_START + ROOT_SIZE + 1 * MiB  # the backup GPT after it
APPEND = "console=ttyAMA0 root=/dev/vda1 rootfstype=ext4 ro panic=1 quiet"

FILES = {
    "boot/extlinux/extlinux.conf": ("default porter\n"
                                    "label porter\n"
                                    "    kernel /boot/Image\n"
                                    "    initrd /boot/initrd.img\n"
                                    f"    append {APPEND}\n"),
    "etc/inittab": ("::sysinit:/etc/init.d/rcS\n"
                    "ttyAMA0::respawn:/sbin/getty -L 115200 ttyAMA0 vt100\n"
                    "::ctrlaltdel:/sbin/reboot\n"
                    "::shutdown:/bin/umount -a -r\n"),
    "etc/init.d/rcS": ("#!/bin/sh\n"
                       "mount -t proc proc /proc\n"
                       "mount -t sysfs sysfs /sys\n"
                       "mount -t tmpfs tmpfs /tmp\n"
                       "mount -t tmpfs tmpfs /run\n"
                       "hostname -F /etc/hostname\n"),
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "porter\n",
    "etc/os-release": ('ID=porter\nNAME="Porter Linux"\nVERSION_ID=0.1\n'
                       'PRETTY_NAME="Porter Linux 0.1"\n'),
}


def shadow_line(password: str) -> str:
    """root's /etc/shadow entry: a SHA-512 crypt hash, made by the host's busybox (the password
    goes in on stdin, never on a command line)."""
    out = subprocess.run(["busybox", "mkpasswd", "-m", "sha512", "-P", "0"], input=password,
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    return f"root:{out}:19723:0:99999:7:::\n"


def build(out: Path, password: str) -> Path:
    """Build the disk image into ``out`` (a folder); returns its path."""
    kernel_pkg = debs.kernel_package(ARCH)
    kver = kernel_pkg.removeprefix("linux-image-")
    resolved = debs.resolve([kernel_pkg, "busybox", "busybox-static"], ARCH)
    binaries = {"busybox": {"bin/busybox": "bin/busybox"}}
    resolved.update(debs.resolve(library_packages(binaries, resolved, ARCH), ARCH))
    trees = {n: debs.extract(p) for n, p in debs.fetch(resolved.values(), ARCH).items()}

    work = out / "work"
    root = work / "root"
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "boot/extlinux",
              "etc/init.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    fs.install_busybox(root, trees["busybox"])
    (root / "sbin/blkid").symlink_to("../bin/busybox")  # an applet the host's list lacks
    fs.install_libraries(root, TRIPLET, [root / "bin/busybox"], trees)
    for rel, text in {**FILES, "etc/shadow": shadow_line(password)}.items():
        (root / rel).write_text(text)
    (root / "etc/init.d/rcS").chmod(0o755)
    shutil.copy2(trees[kernel_pkg] / "boot" / f"vmlinuz-{kver}", root / "boot/Image")
    (root / "boot/initrd.img").write_bytes(
        initramfs(work / "initrd", trees["busybox-static"], trees[kernel_pkg], kver))
    fs.normalize_modes(root)
    (root / "etc/shadow").chmod(0o600)
    (root / "tmp").chmod(0o1777)
    fs.clamp_times(root, EPOCH)

    disk = out / "porter.img"
    placed = write_gpt(disk, DISK_SIZE, "5e1f0a2b-0d4c-4b7e-9a55-0a7e2f3c4d5e", [
        GptEntry(LABEL, ROOT_SIZE, GPT_LINUX, "6a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d",
                 ROOT_START, "LegacyBIOSBootable")])
    rootfs = work / "root.ext4"
    fs.mkext4(rootfs, ROOT_SIZE, label=LABEL, uuid="7b1c2d3e-4f5a-4b6c-9d7e-8f9a0b1c2d3e",
              epoch=EPOCH, src=root, journal=True)
    fs.copy_into(rootfs, disk, placed[0].start)
    shutil.rmtree(work)
    return disk
