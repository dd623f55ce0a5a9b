"""A board porter's own aarch64 image, as the framework never built one for its suites: not
balena-shaped. One ext4 partition (``porter-root``) holds everything: Debian's kernel, the
reference OS's initramfs (it mounts ``root=`` and runs ``/sbin/init``), and
``boot/extlinux/extlinux.conf``, which U-Boot's distro boot finds by itself. Debian's systemd is
init, with its status lines (colour escapes and all) on the serial console; a getty unit there
asks for a login, and root logs in with a password (its hash in /etc/shadow, checked by
busybox login). Made from Debian packages with the reference OS builder's pieces; every byte
but the password's hash depends only on the packages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from hil.flash.partitions import GptEntry, write_gpt
from hil.refos import debs, fs
from hil.refos.builder import (
    BINARIES,
    EPOCH,
    GPT_LINUX,
    SYSTEMD_UNITS,
    MiB,
    initramfs,
    library_packages,
)

ARCH = "arm64"
TRIPLET = "aarch64-linux-gnu"
CONSOLE = "ttyAMA0"
LABEL = "porter-root"
ROOT_START = 1 * MiB
ROOT_SIZE = 128 * MiB
DISK_SIZE = ROOT_START + ROOT_SIZE + 1 * MiB  # the backup GPT after it
APPEND = (f"console={CONSOLE} root=/dev/vda1 rootfstype=ext4 ro panic=1 quiet "
          "systemd.show_status=1")  # the kernel quiet, systemd's status lines on
SYSTEMD = {"systemd": BINARIES["systemd"]}
# systemd's commands for the power, where busybox's applets would signal init as busybox init
# wants (systemd takes SIGTERM as "re-execute")
LINKS = {"sbin/init": "../lib/systemd/systemd",
         **{f"sbin/{n}": "../bin/systemctl" for n in ("reboot", "poweroff", "halt", "shutdown")}}
# what starts at boot: unit -> the target that wants it
ENABLED = {"systemd-journald.socket": "sockets.target",
           "systemd-journald-dev-log.socket": "sockets.target",
           "getty.target": "multi-user.target",
           f"serial-getty@{CONSOLE}.service": "getty.target"}

FILES = {
    "boot/extlinux/extlinux.conf": ("default porter\n"
                                    "label porter\n"
                                    "    kernel /boot/Image\n"
                                    "    initrd /boot/initrd.img\n"
                                    f"    append {APPEND}\n"),
    "lib/systemd/system/serial-getty@.service": (
        "[Unit]\nDescription=Login on %I\nBefore=getty.target\n"
        "[Service]\nExecStart=/sbin/getty -L 115200 %I vt100\nRestart=always\n"
        "UtmpIdentifier=%I\nTTYPath=/dev/%I\nTTYReset=yes\nTTYVHangup=yes\n"
        "KillMode=process\nIgnoreSIGPIPE=no\nSendSIGHUP=yes\n"),
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hostname": "porter\n",
    "etc/machine-id": "",  # empty: systemd makes one up per boot (the root is read-only)
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
    resolved = debs.resolve([kernel_pkg, "busybox", "busybox-static", "systemd"], ARCH)
    binaries = {"busybox": {"bin/busybox": "bin/busybox"}, **SYSTEMD}
    resolved.update(debs.resolve(library_packages(binaries, resolved, ARCH), ARCH))
    trees = {n: debs.extract(p) for n, p in debs.fetch(resolved.values(), ARCH).items()}

    work = out / "work"
    root = work / "root"
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "boot/extlinux",
              "etc", "lib/systemd/system"):
        (root / d).mkdir(parents=True, exist_ok=True)
    elfs = []
    for rel, dest in SYSTEMD["systemd"].items():
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trees["systemd"] / rel, root / dest)
        elfs.append(root / dest)
    for link, target in LINKS.items():
        (root / link).symlink_to(target)
    units = root / "lib/systemd/system"
    for name in SYSTEMD_UNITS:
        shutil.copy2(trees["systemd"] / "lib/systemd/system" / name, units / name)
    (units / "default.target").symlink_to("multi-user.target")
    for unit, target in ENABLED.items():
        (units / f"{target}.wants").mkdir(exist_ok=True)
        (units / f"{target}.wants" / unit).symlink_to(f"../{unit.replace(CONSOLE, '')}")
    # after systemd's programs: an applet never shadows one
    fs.install_busybox(root, trees["busybox"])
    (root / "sbin/blkid").symlink_to("../bin/busybox")  # an applet the host's list lacks
    fs.install_libraries(root, TRIPLET, [*elfs, root / "bin/busybox"], trees)
    for rel, text in {**FILES, "etc/shadow": shadow_line(password)}.items():
        (root / rel).write_text(text)
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
