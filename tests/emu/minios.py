"""A tiny aarch64 OS for driving the emulated bench: Debian's arm64 kernel and a busybox
initramfs that reports what disk it sees and gives a shell on the console. Stands in for the
reference OS (hil/refos) in these tests; built once and cached."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hil.cache import cache_dir
from hil.refos import debs

MODULES = ("virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk")
APPLETS = ("sh", "mount", "insmod", "sleep", "head", "tr", "cat", "poweroff", "uname", "ls",
           "echo", "sync", "dd", "reboot")

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
echo "HIL-MINI up"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
  echo "HIL-MINI disk: $(head -c 16 /dev/vda | tr -c 'A-Za-z0-9-' '.')"
else
  echo "HIL-MINI disk: none"
fi
export PS1='mini# '
exec sh
"""


@dataclass(frozen=True)
class MiniOs:
    kernel: Path
    initrd: Path
    append: str = "console=ttyAMA0 panic=1 quiet"


def build() -> MiniOs:
    out = cache_dir("emu-minios")
    initrd = out / "initrd.cpio.gz"
    kernel_pkg = debs.kernel_package("arm64")
    release = kernel_pkg.removeprefix("linux-image-")
    kernel = out / f"vmlinuz-{release}"
    if kernel.exists() and initrd.exists():
        return MiniOs(kernel, initrd)
    pkgs = debs.resolve(["busybox-static", kernel_pkg], "arm64")
    paths = debs.fetch(pkgs.values(), "arm64")
    ktree = debs.extract(paths[kernel_pkg])
    bbtree = debs.extract(paths["busybox-static"])
    root = out / "root.tmp"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy2(bbtree / "bin" / "busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    mods = ktree / "lib" / "modules" / release / "kernel"
    for m in MODULES:
        found = list(mods.rglob(f"{m}.ko"))
        assert found, f"{m}.ko not in {kernel_pkg}"
        shutil.copy2(found[0], root / "lib" / "modules" / f"{m}.ko")
    init = root / "init"
    init.write_text(INIT.format(modules=" ".join(MODULES)))
    init.chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                          input=names, capture_output=True, check=True).stdout
    tmp = initrd.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio, compresslevel=6))
    tmp.replace(initrd)
    shutil.copy2(ktree / "boot" / f"vmlinuz-{release}", kernel)
    shutil.rmtree(root)
    return MiniOs(kernel, initrd)
