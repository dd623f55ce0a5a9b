"""Build the reference OS disk image from Debian packages, without root, loop devices or mounts.

Pipeline: resolve package versions -> cache key -> (cache hit: done) -> download/extract .debs ->
stage the root filesystem (busybox, chrony, dropbear, jq, e2fsprogs and util-linux tools with
exactly the shared libraries they load, a module subset, kernel + initramfs in /boot) ->
ext4 image -> GPT disk with resin-boot (FAT16 + bootloader files) and the ext4 partitions ->
.bmap. Every byte depends only on the inputs that make up the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from hil.cache import cache_dir
from hil.errors import HilError
from hil.flash import fat
from hil.flash.bmap import create_bmap, write_bmap
from hil.flash.partitions import GptEntry, write_gpt
from hil.lock import HostLock
from hil.refos import debs, fs, pyc

log = logging.getLogger(__name__)

FILES = Path(__file__).parent / "files"
BUILD_LOCK_WAIT = 600.0  # another session building the same board's image
EPOCH = 1704067200  # 2024-01-01: every timestamp in the image
# on resin-boot: this image is an installer (/sbin/init runs the flasher)
FLASHER_MARKER = "hil-flasher"
MiB = 1 << 20

# Partition layout, identical on both architectures (index: name, size). GRUB's core.img
# lives in an extra bios_grub partition (index 6) in the gap before resin-boot on x86_64.
# The roots hold balenaEngine (moby: about 150 MB of Go binaries), resin-data its images.
DISK_SIZE = 1024 * MiB
BOOT_START = 4 * MiB
ROOT_SIZE = 320 * MiB
LAYOUT = (("resin-boot", 40 * MiB), ("resin-rootA", ROOT_SIZE), ("resin-rootB", ROOT_SIZE),
          ("resin-state", 16 * MiB), ("resin-data", None))
BIOS_GRUB = (1 * MiB, 3 * MiB)  # start, size
GPT_FAT = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69E4C7984D"
GPT_BIOS_GRUB = "21686148-6449-6E6F-744E-656564454649"

# Binaries the OS runs, besides busybox: package -> {path in the package: path in the root}.
# balenaEngine is Debian's moby, the code it is forked from; its programs live apart in
# ENGINE_DIR, reached through balenaOS's command names (balenad, balena-engine, balena).
ENGINE_DIR = "usr/lib/balena-engine"
BINARIES: dict[str, dict[str, str]] = {
    "chrony": {"usr/sbin/chronyd": "usr/sbin/chronyd", "usr/bin/chronyc": "usr/bin/chronyc"},
    "dropbear-bin": {"usr/sbin/dropbear": "usr/sbin/dropbear",
                     "usr/bin/dropbearkey": "usr/bin/dropbearkey"},
    "jq": {"usr/bin/jq": "usr/bin/jq"},
    # the engine's API on its socket (balena-healthcheck, os-extra-firmware), as balenaOS asks it
    "curl": {"usr/bin/curl": "usr/bin/curl"},
    "dnsmasq-base": {"usr/sbin/dnsmasq": "usr/sbin/dnsmasq"},
    "avahi-daemon": {"usr/sbin/avahi-daemon": "usr/sbin/avahi-daemon"},
    "e2fsprogs": {"sbin/tune2fs": "sbin/tune2fs", "sbin/mke2fs": "sbin/mke2fs",
                  "sbin/e2fsck": "sbin/e2fsck"},
    "util-linux": {"bin/findmnt": "bin/findmnt", "sbin/blkid": "sbin/blkid",
                   "usr/bin/flock": "usr/bin/flock",
                   "bin/lsblk": "bin/lsblk"},
    "docker.io": {"usr/sbin/dockerd": f"{ENGINE_DIR}/dockerd",
                  "usr/bin/docker": f"{ENGINE_DIR}/docker"},
    "containerd": {"usr/bin/containerd": f"{ENGINE_DIR}/containerd",
                   "usr/bin/ctr": f"{ENGINE_DIR}/ctr",
                   "usr/bin/containerd-shim-runc-v2": f"{ENGINE_DIR}/containerd-shim-runc-v2"},
    "runc": {"usr/sbin/runc": f"{ENGINE_DIR}/runc"},
    "crun": {"usr/bin/crun": f"{ENGINE_DIR}/crun"},
    "tini": {"usr/bin/tini-static": f"{ENGINE_DIR}/docker-init"},
    # the engine's NAT and filter rules, and the supervisor's firewall (iptables' legacy
    # backend: the kernel's x_tables, no nftables)
    "iptables": {"usr/sbin/xtables-legacy-multi": "usr/sbin/xtables-legacy-multi"},
    # init: Debian's systemd, its journal, and the programs units and scripts call
    "systemd": {f"lib/systemd/{n}": f"lib/systemd/{n}"
                for n in ("systemd", "systemd-journald", "systemd-shutdown")}
    | {f"bin/{n}": f"bin/{n}" for n in ("systemctl", "journalctl", "systemd-notify")}
    | {f"usr/bin/{n}": f"usr/bin/{n}" for n in ("systemd-analyze", "systemd-run")},
    # udev: one program, systemd-udevd and udevadm (with the builtins: blkid, path_id)
    "udev": {"bin/udevadm": "bin/udevadm"},
    # NetworkManager: os-networkmanager writes its configuration from config.json, which
    # `NetworkManager --print-config` reads back (the daemon does not run: no D-Bus)
    "network-manager": {"usr/sbin/NetworkManager": "usr/sbin/NetworkManager"},
    # balena's VPN client (openvpn.service), configured by os-config from the API
    "openvpn": {"usr/sbin/openvpn": "usr/sbin/openvpn"},
    # the supervisor stand-in (usr/lib/hil/supervisor.py) is a Python program
    "python3.11-minimal": {"usr/bin/python3.11": "usr/bin/python3"},
}
# Python's standard library, without what the supervisor stand-in never imports (tests, GUIs,
# build tools) and without compiled extensions (the ones it needs are built into python3).
PYTHON_STDLIB = ("libpython3.11-minimal", "libpython3.11-stdlib")
# the compiled modules the OS's Python programs import that python3 lacks built in: mmap
# (disk-watchdogd's page-aligned buffer for O_DIRECT reads)
PYTHON_DYNLOAD = ("mmap",)
# the Python programs started at every boot whose imports are compiled into the image
# (hil.refos.pyc); they run as modules (python3 -m), which reads their own bytecode too
PYTHON_COMPILED = ("usr/lib/hil/supervisor.py",)
PYTHON_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "pydoc_data", "lib-dynload", "distutils", "unittest", "sqlite3", "dbm",
               "curses", "config-3.11-x86_64-linux-gnu", "config-3.11-aarch64-linux-gnu",
               "venv", "xmlrpc", "asyncio", "multiprocessing", "site-packages",
               "dist-packages"}
# balenaEngine's commands are one program on balenaOS (usr/bin/balena-engine), so breaking it
# breaks the daemon and containerd's CLI too, as a test of a broken engine expects
LINKS = {"sbin/e2label": "tune2fs", "sbin/mkfs.ext4": "mke2fs",
         **{f"sbin/{name}": "../bin/systemctl" for name in ("reboot", "poweroff", "halt",
                                                             "shutdown")},
         "lib/systemd/systemd-udevd": "../../bin/udevadm",
         **{f"usr/sbin/{name}": "xtables-legacy-multi"
            for name in ("iptables", "iptables-save", "iptables-restore")},
         **{f"usr/bin/{name}": "balena-engine"
            for name in ("balena", "balenad", "balena-engine-containerd-ctr")}}
# Debian's units the OS needs, by package: systemd's targets, journald and the shutdown path,
# and udev's daemon, coldplug and settle (as balenaOS starts udev). The OS's own units are in
# files/rootfs/lib/systemd/system. Nothing else of Debian's: no logind, no tmpfiles.
SYSTEMD_UNITS = (
    "basic.target", "sysinit.target", "sockets.target", "timers.target", "paths.target",
    "slices.target", "local-fs.target", "local-fs-pre.target", "multi-user.target",
    "network.target", "network-pre.target", "network-online.target", "time-set.target",
    "time-sync.target", "nss-lookup.target", "getty.target", "getty-pre.target",
    "shutdown.target", "umount.target", "final.target", "reboot.target", "poweroff.target",
    "halt.target", "systemd-reboot.service", "systemd-poweroff.service", "systemd-halt.service",
    "systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket", "systemd-journal-flush.service")
UDEV_UNITS = ("systemd-udevd.service", "systemd-udevd-control.socket",
              "systemd-udevd-kernel.socket", "systemd-udev-trigger.service",
              "systemd-udev-settle.service")
# udev's rules: only those balenaOS's mechanisms need (/dev/disk/by-label and by-partlabel;
# by-state is balenaOS's own rule, in files/rootfs/lib/udev/rules.d)
UDEV_RULES = ("60-persistent-storage.rules",)
# what starts at boot: unit -> the target that wants it (a template: its instance on the arch's
# serial console)
ENABLED = {"systemd-journald.socket": "sockets.target",
           "systemd-journald-dev-log.socket": "sockets.target",
           "sshd.socket": "sockets.target",
           "os-sshkeys-conf.path": "basic.target",
           "systemd-udevd-control.socket": "sockets.target",
           "systemd-udevd-kernel.socket": "sockets.target",
           "systemd-udevd.service": "sysinit.target",
           "systemd-udev-trigger.service": "sysinit.target",
           "config-json.path": "basic.target",
           "os-udevrules-conf.path": "basic.target",
           "os-extra-firmware-conf.path": "basic.target",
           "os-networkmanager-conf.path": "basic.target",
           "systemd-journal-flush.service": "sysinit.target",
           "rollback-altboot.service": "sysinit.target",
           "getty.target": "multi-user.target",
           "serial-getty@.service": "getty.target",
           **{u: "multi-user.target" for u in (
               "network-dhcp.service", "sshdgenkeys.service", "os-sshkeys.service",
               "recover-sshd-socket.timer", "os-config.service", "os-config.timer",
               "dnsmasq.service", "chronyd.service", "avahi-daemon.service",
               "balena.service", "balena-supervisor.service", "os-udevrules.service",
               "os-extra-firmware.service", "os-networkmanager.service",
               "rollback-health.service", "hil-provision.service", "hil-ready.service",
               "update-balena-supervisor.timer", "disk-watchdog-boot-history.service",
               "disk-watchdogd.service", "prepare-openvpn.service", "openvpn.service")}}
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# iptables' tables, matches and targets are loaded on demand (the kernel and iptables call
# modprobe): the engine's NAT and forwarding rules, the supervisor's firewall
NETFILTER_MODULES = ("ip_tables", "iptable_filter", "iptable_nat", "xt_MASQUERADE", "xt_nat",
                     "xt_addrtype", "xt_conntrack", "xt_state", "xt_comment", "xt_tcpudp",
                     "ipt_REJECT", "br_netfilter")
# test_firmware: the kernel's own firmware-loader test driver, which requests a firmware file
# by name; the suites load it to see where the kernel finds firmware (balenaOS's extra-firmware
# test builds a module of its own for that)
ROOTFS_MODULES = (*INITRD_MODULES, "overlay", "virtio_net", "vfat", "nls_cp437", "nls_ascii",
                  "nls_utf8", "i6300esb", "virtio_rng", "bridge", "veth", "loop", "dm_mod",
                  *NETFILTER_MODULES, "test_firmware", "leds_gpio", "tun")
# loaded by /sbin/init (overlay is loaded first, on its own); bridge and veth: the engine's
# network; loop and dm_mod: loop devices and the device mapper, as balenaOS's kernels have them
# (with no tmpfiles to create their static nodes, they are loaded, not left to load on first
# use); leds_gpio: the QEMU aarch64 board's LED (files/uboot/boot.cmd), as udev's coldplug
# here is of block devices only; tun: the VPN's device (/dev/net/tun appears with it)
MODULES_LOAD = ("virtio_net", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "i6300esb",
                "virtio_rng", "bridge", "veth", "loop", "dm_mod", "leds_gpio", "tun")
HOST_TOOLS = ("e2fsprogs", "dosfstools", "mtools", "fdisk", "u-boot-tools", "grub-common",
              "grub-pc-bin", "busybox-static", "kmod")


class RefosBuildError(HilError):
    """The reference OS image could not be built."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    deb_arch: str
    triplet: str
    console: str
    bootloader: str  # "uboot" or "grub"
    device_type: str
    kernel_name: str  # name of the kernel in the root's /boot
    # the supervisor's LED_FILE (supervisor.conf), as balenaOS's machine sets it: /dev/null
    # where the board has no LED
    led_file: str


ARCHES = {
    "aarch64": ArchSpec("aarch64", "arm64", "aarch64-linux-gnu", "ttyAMA0", "uboot",
                        "generic-aarch64", "Image", "/sys/class/leds/led0/brightness"),
    "x86_64": ArchSpec("x86_64", "amd64", "x86_64-linux-gnu", "ttyS0", "grub",
                       "genericx86-64-ext", "vmlinuz", "/dev/null"),
}


@dataclass(frozen=True)
class RefosImage:
    """A built reference OS. ``disk`` is the raw image to flash, ``bmap`` its block map,
    ``rootfs`` the root filesystem alone (what ``hostapp-update -f`` installs)."""

    arch: str
    version: str
    disk: Path
    bmap: Path
    rootfs: Path
    key: str
    device_type: str
    kernel_version: str
    packages: dict[str, str]
    # an installer image for flasher boards (NUC, BBB): boots, copies itself to the board's
    # internal disk as an installed OS, powers the board off
    flasher: bool = False
    # aarch64: U-Boot environment for QEMU's second pflash bank (the board's SPI flash):
    # bootdelay=0 and a bootcmd that runs boot.scr directly. Optional; without it U-Boot's
    # default distro boot finds boot.scr too, about 2.5 s later.
    uboot_env: Path | None = None

    @property
    def directory(self) -> Path:
        return self.disk.parent


def build(arch: str = "aarch64", version: str = "1.0.0", flasher: bool = False) -> RefosImage:
    """Build (or take from the cache) the reference OS image for ``arch``.

    ``flasher=True`` gives the installer image of flasher boards: the same bytes plus a
    ``hil-flasher`` marker on resin-boot, which makes the OS install itself to the internal
    disk and power off. (Updates that fail on purpose are made from a good one in place, as
    balenaOS's tests make them: ``hil.os.BalenaOS.break_update``.)
    """
    if arch not in ARCHES:
        raise RefosBuildError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHES)}")
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+_~-]{0,63}", version):
        raise RefosBuildError(f"version {version!r}: use letters, digits and . + _ ~ -")
    # Sessions run side by side (make test): one fetches and builds, the others wait for the
    # lock and find its image in the cache.
    lock = HostLock(f"build-{arch}", f"the {arch} reference OS build", part="refos",
                    directory=cache_dir("refos"))
    lock.acquire(BUILD_LOCK_WAIT, f"building the {arch} reference OS {version}",
                 on_wait=log.warning)
    try:
        return _Builder(ARCHES[arch], version, flasher).run()
    finally:
        lock.release()


class _Builder:
    def __init__(self, spec: ArchSpec, version: str, flasher: bool) -> None:
        self.spec, self.version, self.flasher = spec, version, flasher

    # --- inputs and key --------------------------------------------------------------------

    def run(self) -> RefosImage:
        t0 = time.monotonic()
        kernel_pkg = debs.kernel_package(self.spec.deb_arch)
        roots = [kernel_pkg, "busybox-static", "busybox", *BINARIES, *PYTHON_STDLIB]
        resolved = debs.resolve(roots, self.spec.deb_arch)
        libs = self._library_packages(resolved)
        resolved.update(debs.resolve(libs, self.spec.deb_arch))
        key = self._key(resolved)
        kind = "flasher" if self.flasher else "ok"
        name = f"{self.spec.name}-{self.version}-{kind}-{key[:12]}"
        out = cache_dir("refos") / name
        manifest = out / "manifest.json"
        if manifest.exists():
            log.info("reference OS %s: cached in %s", name, out)
            return _image_from(json.loads(manifest.read_text()), out)
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir("refos")))
        try:
            paths = debs.fetch(resolved.values(), self.spec.deb_arch)
            trees = {n: debs.extract(p) for n, p in paths.items()}
            image = self._build(stage, out, key, resolved, trees, kernel_pkg)
            for tmp in (stage / "work",):
                shutil.rmtree(tmp, ignore_errors=True)
            (stage / "manifest.json").write_text(json.dumps(
                {**asdict(image), "disk": image.disk.name, "bmap": image.bmap.name,
                 "rootfs": image.rootfs.name,
                 "uboot_env": image.uboot_env.name if image.uboot_env else None},
                indent=1, sort_keys=True) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            stage.rename(out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        _prune(out)
        log.info("reference OS %s built in %.1fs", name, time.monotonic() - t0)
        return _image_from(json.loads(manifest.read_text()), out)

    def _library_packages(self, resolved: dict[str, debs.Deb]) -> list[str]:
        return library_packages(BINARIES, resolved, self.spec.deb_arch)

    def _key(self, resolved: dict[str, debs.Deb]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({
            "arch": self.spec.name, "version": self.version, "flasher": self.flasher,
            "packages": sorted((d.name, d.version, d.arch) for d in resolved.values()),
            "host": _host_tool_versions(),
            "python": sys.implementation.cache_tag,  # whether the image holds bytecode
        }, sort_keys=True).encode())
        package = Path(__file__).parent.parent  # hil/
        # bytecode a host-side test left beside the supervisor's source is neither an input
        # nor part of the image (a clean clone has none)
        sources = [*sorted(p for p in FILES.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts),
                   *(package / "refos" / n for n in ("builder.py", "fs.py", "debs.py",
                                                     "grub.py", "appimage.py", "pyc.py")),
                   # the image's partition table, boot partition and bmap are written there
                   *(package / "flash" / n for n in ("partitions.py", "fat.py", "bmap.py",
                                                     "pipeline.py"))]
        for path in sources:
            h.update(str(path.relative_to(package)).encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
        return h.hexdigest()

    # --- the build proper ------------------------------------------------------------------

    def _uuid(self, key: str, role: str) -> str:
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"hil-refos:{key}:{role}"))

    def _build(self, stage: Path, out: Path, key: str, resolved: dict[str, debs.Deb],
               trees: dict[str, Path], kernel_pkg: str) -> RefosImage:
        work = stage / "work"
        kernel_tree = trees[kernel_pkg]
        kver = kernel_pkg.removeprefix("linux-image-")
        _depmod_once(kernel_tree, kver)

        root = work / "root"
        self._stage_rootfs(root, trees, kernel_tree, kver)
        initrd = initramfs(work / "initrd", trees["busybox-static"], kernel_tree, kver)
        (root / "boot" / "initrd.img").write_bytes(initrd)
        (root / "boot" / "initrd.img").chmod(0o644)
        fs.clamp_times(root, EPOCH)

        rootfs = stage / "rootfs.img"
        fs.mkext4(rootfs, ROOT_SIZE, label="resin-rootA", uuid=self._uuid(key, "root"),
                  epoch=EPOCH, src=root, journal=False)
        disk = stage / "disk.img"
        self._disk(disk, rootfs, key, work)
        bmap = stage / "disk.img.bmap"
        write_bmap(create_bmap(disk, zero_blocks=False), bmap)
        uboot_env = None
        if self.spec.bootloader == "uboot":
            uboot_env = stage / "uboot-env.bin"
            _uboot_env(uboot_env, work)
        return RefosImage(
            arch=self.spec.name, version=self.version, disk=out / disk.name,
            bmap=out / bmap.name, rootfs=out / rootfs.name, key=key,
            device_type=self.spec.device_type, kernel_version=kver, flasher=self.flasher,
            packages={d.name: d.version for d in sorted(resolved.values(),
                                                        key=lambda d: d.name)},
            uboot_env=out / uboot_env.name if uboot_env else None)

    def _stage_rootfs(self, root: Path, trees: dict[str, Path], kernel_tree: Path,
                      kver: str) -> None:
        shutil.copytree(FILES / "rootfs", root, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for d in ("dev", "proc", "sys", "run", "tmp", "mnt/boot", "mnt/state", "mnt/data",
                  "mnt/sysroot/active", "mnt/sysroot/inactive", "data", "home/root", "boot",
                  "var/lib/docker", "etc/hil", "etc/udev/rules.d", "etc/NetworkManager/conf.d",
                  "etc/openvpn",
                  "lib/udev/rules.d", "root"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for link, target in (("var/volatile", "../run/volatile"), ("var/log", "volatile/log"),
                             ("var/run", "../run"),
                             ("var/tmp", "../tmp"), ("var/lock", "../run/lock"),
                             ("etc/mtab", "../proc/self/mounts")):
            (root / link).symlink_to(target)

        elfs: list[Path] = []
        for pkg, rels in BINARIES.items():
            for rel, dest in rels.items():
                dst = root / dest
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(trees[pkg] / rel, dst)
                elfs.append(dst)
        # iptables opens its matches and targets as plugins, by name, from its own directory
        xt = f"usr/lib/{self.spec.triplet}/xtables"
        shutil.copytree(trees["iptables"] / xt, root / xt, symlinks=True)
        elfs.extend(p for p in sorted((root / xt).glob("*.so")) if not p.is_symlink())
        for link, target in LINKS.items():
            (root / link).symlink_to(target)
        self._install_units(root, trees)
        for rule in UDEV_RULES:
            shutil.copy2(trees["udev"] / "lib/udev/rules.d" / rule,
                         root / "lib/udev/rules.d" / rule)
        for pkg in PYTHON_STDLIB:
            shutil.copytree(trees[pkg] / "usr/lib/python3.11", root / "usr/lib/python3.11",
                            symlinks=True, dirs_exist_ok=True,
                            ignore=lambda _d, names: [n for n in names if n in PYTHON_SKIP])
        dynload = root / "usr/lib/python3.11/lib-dynload"
        dynload.mkdir()  # python3 looks for it at start
        for name in PYTHON_DYNLOAD:
            so = f"{name}.cpython-311-{self.spec.triplet}.so"
            shutil.copy2(trees["libpython3.11-stdlib"] / "usr/lib/python3.11/lib-dynload" / so,
                         dynload / so)
            elfs.append(dynload / so)
        for program in PYTHON_COMPILED:
            pyc.compile_imports(root, program)
        # after the real binaries: an applet never shadows one (busybox has a mke2fs too).
        # Debian's dynamic busybox, not busybox-static (the initramfs's): the static one's
        # shell runs its own applets before any program on PATH, so `reboot` would be its
        # applet, which signals init the way busybox init wants and systemd takes otherwise.
        fs.install_busybox(root, trees["busybox"])
        elfs.append(root / "bin/busybox")
        fs.install_libraries(root, self.spec.triplet, elfs, trees)

        # kernel, modules (only those the OS loads, plus their dependencies)
        shutil.copy2(kernel_tree / "boot" / f"vmlinuz-{kver}",
                     root / "boot" / self.spec.kernel_name)
        mods = _module_closure(kernel_tree, kver, ROOTFS_MODULES)
        moddir = root / "lib" / "modules" / kver
        for rel in mods:
            (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kernel_tree / "lib" / "modules" / kver / rel, moddir / rel)
        for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            src = kernel_tree / "lib" / "modules" / kver / meta
            if src.exists():
                shutil.copy2(src, moddir / meta)
        fs.run(["depmod", "-b", str(root), kver])

        etc = root / "etc"
        (etc / "hil" / "build.env").write_text(
            f"ARCH={self.spec.name}\nBOOTLOADER={self.spec.bootloader}\n"
            f"DEVICE_TYPE={self.spec.device_type}\n")
        (etc / "hil" / "modules.load").write_text("\n".join(MODULES_LOAD) + "\n")
        (etc / "os-release").write_text(
            'ID="balena-os"\nNAME="balenaOS"\n'
            f'VERSION="{self.version}"\nVERSION_ID="{self.version}"\n'
            f'PRETTY_NAME="balenaOS {self.version} (pytest-hil reference OS)"\n'
            f'MACHINE="{self.spec.device_type}"\nSLUG="{self.spec.device_type}"\n'
            f'META_BALENA_VERSION="{self.version}"\n'
            'VARIANT_ID="hil-refos"\n')
        (etc / "balena-supervisor").mkdir(exist_ok=True)
        (etc / "balena-supervisor" / "supervisor.conf").write_text(
            "# This file represents the last known version of the supervisor\n"
            "SUPERVISOR_IMAGE=balena-supervisor-hil\nSUPERVISOR_VERSION=0.0.0-hil\n"
            f"LED_FILE={self.spec.led_file}\n")
        (etc / "hostname").write_text("balena\n")
        (etc / "hosts").write_text("127.0.0.1\tlocalhost\n")
        (etc / "resolv.conf").write_text("")
        fs.normalize_modes(root)
        (root / "tmp").chmod(0o1777)

    def _install_units(self, root: Path, trees: dict[str, Path]) -> None:
        unitdir = root / "lib/systemd/system"
        for pkg, names in (("systemd", SYSTEMD_UNITS), ("udev", UDEV_UNITS)):
            for name in names:
                shutil.copy2(trees[pkg] / "lib/systemd/system" / name, unitdir / name)
        (unitdir / "default.target").symlink_to("multi-user.target")
        # enabled as `systemctl enable` does (and balenaOS's image build): links in /etc, so
        # `systemctl is-enabled` says enabled
        for unit, target in ENABLED.items():
            wants = root / "etc/systemd/system" / f"{target}.wants"
            wants.mkdir(parents=True, exist_ok=True)
            instance = unit.replace("@.", f"@{self.spec.console}.")
            (wants / instance).symlink_to(f"/lib/systemd/system/{unit}")

    def _disk(self, disk: Path, rootfs: Path, key: str, work: Path) -> None:
        entries = []
        start = BOOT_START
        for i, (name, size) in enumerate(LAYOUT, start=1):
            ptype = GPT_FAT if name == "resin-boot" else GPT_LINUX
            entries.append(GptEntry(name, size, ptype, self._uuid(key, f"part{i}"), start,
                                    "LegacyBIOSBootable" if i == 1 else ""))
            start += size or 0
        if self.spec.bootloader == "grub":
            entries.append(GptEntry("bios_grub", BIOS_GRUB[1], GPT_BIOS_GRUB,
                                    self._uuid(key, "part6"), BIOS_GRUB[0]))
        placed = {p.number: p for p in write_gpt(disk, DISK_SIZE, self._uuid(key, "disk"),
                                                 entries)}
        boot = placed[1]
        fat.make_fat(disk, boot, label="resin-boot", volume_id=self._uuid(key, "boot")[:8])
        fat.write_files(disk, boot, self._boot_files(work), epoch=EPOCH)
        fs.copy_into(rootfs, disk, placed[2].start)
        for index, label, journal in ((3, "resin-rootB", False), (4, "resin-state", True),
                                      (5, "resin-data", True)):
            img = work / f"p{index}.img"
            src = None
            if label in ("resin-state", "resin-data"):
                # each with its reset flag: a boot that finds it missing resets the partition
                src = work / label
                (src / ("root-overlay" if label == "resin-state" else "resin-data")).mkdir(
                    parents=True)
                (src / "remove_me_to_reset").write_text("")
                fs.clamp_times(src, EPOCH)
            fs.mkext4(img, placed[index].size, label=label, uuid=self._uuid(key, label),
                      epoch=EPOCH, src=src, journal=journal)
            fs.copy_into(img, disk, placed[index].start)
            img.unlink()
        if self.spec.bootloader == "grub":
            from hil.refos import grub

            grub.install(disk, core_offset=placed[6].start, core_size=placed[6].size,
                         work=work)

    def _boot_files(self, work: Path) -> dict[str, bytes]:
        config = {"deviceType": self.spec.device_type, "developmentMode": True,
                  "persistentLogging": False}
        files = {"config.json": (json.dumps(config, indent=1) + "\n").encode()}
        if self.flasher:
            files[FLASHER_MARKER] = (b"This is an installer: it writes itself to the board's "
                                     b"internal disk (without this file) and powers off.\n")
        if self.spec.bootloader == "uboot":
            cmd = work / "boot.cmd"
            text = (FILES / "uboot" / "boot.cmd").read_text().replace("@CONSOLE@",
                                                                      self.spec.console)
            # U-Boot's hush has no use for our comments; keep the script lean
            cmd.write_text("".join(line for line in text.splitlines(keepends=True)
                                   if not line.lstrip().startswith("#")))
            scr = work / "boot.scr"
            fs.run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none",
                    "-n", "hil-refos boot script", "-d", str(cmd), str(scr)],
                   env={"SOURCE_DATE_EPOCH": str(EPOCH)})
            files["boot.scr"] = scr.read_bytes()
            files["resinOS_uEnv.txt"] = b"resin_root_part=2\nupgrade_available=0\n"
            files["bootcount.env"] = b"bootcount=0\n"
            files["extra_uEnv.txt"] = b""  # the OS's bootloader_config_modify fills it
        else:
            from hil.refos import grub

            files.update(grub.boot_files(self.spec.console))
        return files


def library_packages(binaries: dict[str, dict[str, str]], resolved: dict[str, debs.Deb],
                     arch: str) -> list[str]:
    """Packages that ship the shared libraries ``binaries`` (package -> {path in it: ...})
    need (worked out once per set of root package versions, then remembered)."""
    ident = hashlib.sha256(json.dumps(
        [sorted((d.name, d.version) for d in resolved.values()),
         sorted((k, sorted(v)) for k, v in binaries.items())]).encode()).hexdigest()[:16]
    memo = debs.debs_dir(arch) / f"closure-{ident}.json"
    if memo.exists():
        return list(json.loads(memo.read_text()))
    paths = debs.fetch([resolved[n] for n in binaries], arch)
    trees = {n: debs.extract(p) for n, p in paths.items()}
    level = [trees[pkg] / rel for pkg, rels in binaries.items() for rel in rels]
    pkgs: dict[str, Path] = {}
    seen: set[str] = set()
    while level:  # breadth first, so each level is one apt-get call
        wanted: dict[str, str] = {}
        for elf in level:
            deps = debs.elf_deps(elf)
            for soname in deps.needed if deps else ():
                if soname not in seen:
                    seen.add(soname)
                    wanted[soname] = debs.soname_package(soname)
        new = sorted(set(wanted.values()) - set(pkgs))
        if new:
            got = debs.fetch(debs.resolve(new, arch).values(), arch)
            pkgs.update({n: debs.extract(p) for n, p in got.items()})
        level = []
        for soname, pkg in sorted(wanted.items()):
            lib = debs.find_in_tree(pkgs[pkg], soname)
            if lib is None:
                raise RefosBuildError(f"{pkg} does not contain {soname}")
            level.append(lib.resolve())
    result = sorted(pkgs)
    memo.write_text(json.dumps(result) + "\n")
    return result


def initramfs(work: Path, busybox_tree: Path, kernel_tree: Path, kver: str) -> bytes:
    """The gzipped initramfs: busybox-static, the storage modules of ``INITRD_MODULES``, and
    files/initramfs/init, which mounts ``root=`` read-only and runs its ``init=``."""
    _depmod_once(kernel_tree, kver)
    work.mkdir(parents=True)
    for d in ("bin", "sbin", "dev", "proc", "sys", "newroot", "etc", "lib/modules"):
        (work / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox_tree / "bin" / "busybox", work / "bin" / "busybox")
    for applet in ("sh", "mount", "umount", "insmod", "sleep", "switch_root", "cat",
                   "echo"):
        (work / "bin" / applet).symlink_to("busybox")
    shutil.copy2(FILES / "initramfs" / "init", work / "init")
    (work / "init").chmod(0o755)
    order = []
    for rel in _module_closure(kernel_tree, kver, INITRD_MODULES):
        if Path(rel).name.startswith("crc32c-intel"):
            continue  # needs SSE4.2, which QEMU's default x86 CPU lacks; crc32c_generic does

        name = Path(rel).name
        shutil.copy2(kernel_tree / "lib" / "modules" / kver / rel,
                     work / "lib" / "modules" / name)
        order.append(name)
    (work / "etc" / "modules.order").write_text("\n".join(order) + "\n")
    fs.normalize_modes(work)
    fs.clamp_times(work, EPOCH)
    return fs.gzip_fixed(fs.cpio_newc(work, EPOCH, {"dev/console": (5, 1)}))


def _image_from(manifest: dict[str, object], out: Path) -> RefosImage:
    packages = manifest["packages"]
    assert isinstance(packages, dict)
    return RefosImage(
        arch=str(manifest["arch"]), version=str(manifest["version"]),
        disk=out / str(manifest["disk"]), bmap=out / str(manifest["bmap"]),
        rootfs=out / str(manifest["rootfs"]), key=str(manifest["key"]),
        device_type=str(manifest["device_type"]),
        kernel_version=str(manifest["kernel_version"]),
        flasher=bool(manifest.get("flasher", False)),
        packages={str(k): str(v) for k, v in packages.items()},
        uboot_env=out / str(manifest["uboot_env"]) if manifest.get("uboot_env") else None)


# qemu_arm64's own addresses (from its default environment); fdtcontroladdr is set at run time
UBOOT_ENV = {
    "bootdelay": "0",
    "scriptaddr": "0x40200000", "loadaddr": "0x40200000", "kernel_addr_r": "0x40400000",
    "ramdisk_addr_r": "0x44000000", "fdt_addr": "0x40000000", "fdt_high": "0xffffffff",
    "pxefile_addr_r": "0x40300000",
    "bootcmd": "virtio scan; if load virtio 0:1 ${scriptaddr} boot.scr; then "
               "source ${scriptaddr}; fi; echo HIL-BOOT: no boot.scr on virtio 0:1",
}
PFLASH_SIZE = 64 * MiB
UBOOT_ENV_SIZE = 0x40000


def _uboot_env(path: Path, work: Path) -> None:
    txt = work / "uboot-env.txt"
    txt.write_text("".join(f"{k}={v}\n" for k, v in sorted(UBOOT_ENV.items())))
    fs.run(["mkenvimage", "-s", str(UBOOT_ENV_SIZE), "-o", str(path), str(txt)])
    with path.open("r+b") as f:
        f.truncate(PFLASH_SIZE)


def _prune(out: Path, keep: int = 3) -> None:
    """Bound the cache: keep the ``keep`` newest builds of the same arch/version/kind (older
    inputs), and drop staging directories of builds that died more than an hour ago."""
    prefix = out.name[:-12]
    same = sorted((p for p in out.parent.iterdir()
                   if p.is_dir() and p.name.startswith(prefix) and len(p.name) == len(out.name)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in same if p != out][keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out.parent.glob(".*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def _host_tool_versions() -> dict[str, str]:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *HOST_TOOLS],
                          capture_output=True, text=True, check=False)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def _depmod_once(kernel_tree: Path, kver: str) -> None:
    marker = kernel_tree / ".hil-depmod"
    if not marker.exists():
        fs.run(["depmod", "-b", str(kernel_tree), kver])
        marker.touch()


def _module_closure(kernel_tree: Path, kver: str, names: Iterable[str]) -> list[str]:
    """Module files (relative to /lib/modules/<kver>) for ``names`` and their dependencies,
    in load order. Built-in modules contribute nothing."""
    moddir = kernel_tree / "lib" / "modules" / kver
    ordered: list[str] = []
    for name in names:
        out = fs.run(["modprobe", "-d", str(kernel_tree), "-S", kver, "--show-depends", name])
        for line in out.splitlines():
            if line.startswith("insmod "):
                rel = os.path.relpath(line.split()[1], moddir)
                if rel not in ordered:
                    ordered.append(rel)
    return ordered
