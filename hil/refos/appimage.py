"""App container images built from Debian packages, without an engine or the internet.

The suites' containers run these on any device (the reference OS or a real balenaOS board of
the same architecture): ``busybox`` is busybox-static alone, ``gpiod`` adds libgpiod's tools
to it, ``dmsetup`` adds the device mapper's tool. An image is a ``docker save``
archive (``manifest.json``, the config and one layer), which ``balena-engine load`` takes;
the bytes depend only on the package versions and this file, so the image ID is stable and a
device that already holds it needs nothing sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hil.cache import cache_dir
from hil.errors import HilError
from hil.refos import debs, fs

EPOCH = 1704067200  # 2024-01-01, as the OS image
# `uname -m` on the device -> Debian (and OCI) architecture
MACHINES = {"aarch64": "arm64", "arm64": "arm64", "x86_64": "amd64", "amd64": "amd64",
            "armv7l": "armhf", "armhf": "armhf"}
PATH_ENV = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
# Debian architecture -> the loader's library directory (64-bit only: debs.elf_deps)
TRIPLETS = {"arm64": "aarch64-linux-gnu", "amd64": "x86_64-linux-gnu"}


class AppImageError(HilError):
    """An app image could not be built."""


@dataclass(frozen=True)
class AppImage:
    """A built image: ``path`` is the archive for ``balena-engine load``, ``tag`` its name
    there and ``id`` the engine's image ID (``sha256:`` of the config)."""

    tag: str
    path: Path
    arch: str
    id: str


def deb_arch(machine: str) -> str:
    try:
        return MACHINES[machine]
    except KeyError:
        raise AppImageError(f"no app images for architecture {machine!r} (known: "
                            f"{', '.join(sorted(MACHINES))})") from None


def busybox(machine: str) -> AppImage:
    """busybox-static for ``machine`` (``uname -m`` or a Debian architecture) as an image
    tagged ``hil/busybox:<Debian version>``, running ``sh``."""
    return _build("busybox", "busybox-static", [], machine, lambda root, trees: None)


def gpiod(machine: str) -> AppImage:
    """libgpiod's tools (Debian's ``gpiod``: gpiodetect, gpioinfo, gpioget, gpioset,
    gpiomon, gpiofind) with their libraries and busybox's shell, tagged
    ``hil/gpiod:<Debian version of gpiod>``."""
    arch = deb_arch(machine)
    if arch not in TRIPLETS:
        raise AppImageError(f"no gpiod image for {arch}: its libraries are not worked out for "
                            "32-bit programs")

    def add_tools(root: Path, trees: dict[str, Path]) -> None:
        tools = sorted((trees["gpiod"] / "usr/bin").glob("gpio*"))
        if not tools:
            raise AppImageError("Debian's gpiod package has no /usr/bin/gpio* tools")
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        for tool in tools:
            shutil.copy2(tool, root / "usr/bin" / tool.name)
        fs.install_libraries(root, TRIPLETS[arch], [root / "usr/bin" / t.name for t in tools],
                             trees)

    return _build("gpiod", "gpiod", ["libgpiod2", "libc6"], machine, add_tools)


def dmsetup(machine: str) -> AppImage:
    """The device mapper's tool (Debian's dmsetup) with its libraries and busybox's applets
    (losetup, blockdev, mkfs), tagged ``hil/dmsetup:<Debian version of dmsetup>``: what
    balenaOS's disk watchdog test runs in a privileged container (balenaOS has no dmsetup)."""
    arch = deb_arch(machine)
    if arch not in TRIPLETS:
        raise AppImageError(f"no dmsetup image for {arch}: its libraries are not worked out "
                            "for 32-bit programs")

    def add_tool(root: Path, trees: dict[str, Path]) -> None:
        tool = trees["dmsetup"] / "sbin/dmsetup"
        if not tool.is_file():
            raise AppImageError("Debian's dmsetup package has no /sbin/dmsetup")
        (root / "sbin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(tool, root / "sbin/dmsetup")
        fs.install_libraries(root, TRIPLETS[arch], [root / "sbin/dmsetup"], trees)

    return _build("dmsetup", "dmsetup", ["libdevmapper1.02.1", "libselinux1", "libpcre2-8-0",
                                         "libudev1", "libc6"], machine, add_tool)


def _build(name: str, main: str, others: list[str], machine: str,
           populate: Callable[[Path, dict[str, Path]], None]) -> AppImage:
    """An image of busybox-static's shell and applets plus what ``populate`` adds to its root
    from the extracted packages (``main`` and ``others``), tagged ``hil/<name>:<main's
    version>``; built once per package versions and this file."""
    arch = deb_arch(machine)
    resolved = debs.resolve(["busybox-static", main, *others], arch)
    tag = f"hil/{name}:{_tag_safe(resolved[main].version)}"
    cmd = ["sh"]
    versions = sorted((d.name, d.version) for d in resolved.values())
    src = Path(__file__).read_bytes()
    key = hashlib.sha256(json.dumps([tag, arch, versions, cmd]).encode() + src).hexdigest()
    out = cache_dir("apps") / f"{name}-{arch}-{key[:16]}.tar"
    if not out.exists():
        trees = {n: debs.extract(p) for n, p in debs.fetch(resolved.values(), arch).items()}
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage.") as tmp:
            root = Path(tmp) / "root"
            for d in ("bin", "etc", "tmp", "data", "proc", "sys", "dev"):
                (root / d).mkdir(parents=True)
            fs.install_busybox(root, trees["busybox-static"])
            populate(root, trees)
            fs.normalize_modes(root)
            (root / "tmp").chmod(0o1777)
            archive = Path(tmp) / "image.tar"
            made_of = ", ".join(f"{n} {v}" for n, v in versions)
            docker_archive(root, tag, arch, archive, created_by=made_of, cmd=cmd)
            archive.rename(out)
    return AppImage(tag, out, arch, image_id(out))


def docker_archive(root: Path, tag: str, arch: str, out: Path, *, created_by: str,
                   cmd: list[str]) -> None:
    """``root`` as a one-layer ``docker save`` archive ``out``, byte for byte reproducible.
    The layer is staged beside ``out``, not in memory: a hostapp's is an OS's root."""
    layer = out.with_name(out.name + ".layer")
    _layer(root, layer)
    digest = hashlib.sha256()
    with layer.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    diff_id = digest.hexdigest()
    created = "2024-01-01T00:00:00Z"
    config = json.dumps({
        "architecture": arch, "os": "linux", "created": created,
        "config": {"Env": [PATH_ENV], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": created, "created_by": f"pytest-hil: {created_by}"}],
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag],
                            "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    with tarfile.open(out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add_dir(tar, diff_id)
        with layer.open("rb") as f:
            _add_file(tar, f"{diff_id}/layer.tar", f, layer.stat().st_size)
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            _add_file(tar, name, io.BytesIO(data), len(data))
    layer.unlink()


def image_id(archive: Path) -> str:
    """The engine's ID for the image in ``archive``: sha256 of its config."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise AppImageError(f"{archive}: no manifest.json")
        config = json.loads(member.read())[0]["Config"]
    return "sha256:" + Path(config).stem


def _layer(root: Path, out: Path) -> None:
    with tarfile.open(out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in fs.walk_sorted(root):
            rel = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: BinaryIO, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, EPOCH
    tar.addfile(info, data)


def _tag_safe(version: str) -> str:
    """A Debian version as an image tag ([A-Za-z0-9_.-], at most 128 characters)."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in version)[:128]
