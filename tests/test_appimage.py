"""App images (hil/refos/appimage.py) built from Debian packages: byte for byte the same on
every build, and the gpiod one holding libgpiod's tools with every library they need."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from hil.refos import appimage, debs


def layer_files(image: appimage.AppImage) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(image.path) as outer:
        name = next(n for n in outer.getnames() if n.endswith("/layer.tar"))
        member = outer.extractfile(name)
        assert member is not None
        with tarfile.open(fileobj=io.BytesIO(member.read())) as layer:
            return {m.name: m for m in layer.getmembers()}


@pytest.mark.parametrize("machine", ["aarch64", "x86_64"])
def test_gpiod_image_is_reproducible_and_complete(machine: str, tmp_path: Path) -> None:
    first = appimage.gpiod(machine)
    data = first.path.read_bytes()
    first.path.unlink()  # built again from the same packages
    again = appimage.gpiod(machine)
    assert again.path.read_bytes() == data, "two builds of the gpiod image differ"
    assert again.id == first.id and again.tag.startswith("hil/gpiod:")
    files = layer_files(again)
    for tool in ("gpiodetect", "gpioinfo", "gpioget", "gpioset"):
        assert f"usr/bin/{tool}" in files, f"{tool} missing from the image"
    triplet = appimage.TRIPLETS[appimage.deb_arch(machine)]
    # what the tools need, read from their ELF headers: all of it in the image
    with tarfile.open(again.path) as outer:
        member = outer.extractfile(next(n for n in outer.getnames()
                                        if n.endswith("/layer.tar")))
        assert member is not None
        with tarfile.open(fileobj=io.BytesIO(member.read())) as layer:
            layer.extract("usr/bin/gpioinfo", tmp_path, filter="data")
    deps = debs.elf_deps(tmp_path / "usr/bin/gpioinfo")
    assert deps is not None and "libgpiod.so.2" in deps.needed, deps
    for soname in deps.needed:
        assert f"lib/{triplet}/{soname}" in files, f"{soname} missing from the image"
    assert deps.interp and deps.interp.lstrip("/") in files, f"{deps.interp} missing"


def test_no_gpiod_image_for_32_bit() -> None:
    with pytest.raises(appimage.AppImageError, match="armhf"):
        appimage.gpiod("armv7l")


def test_hostapp_archive_carries_the_shrunk_root_filesystem(tmp_path: Path) -> None:
    """The OS update as a container image (``hostapp-update -i``): one layer holding
    ``rootfs.img``, the root filesystem as ``-f`` gets it (shrunk), tagged by VERSION, for
    the build's architecture; made once, beside the build."""
    from hil.os.transfer import shrink_rootfs
    from hil.refos.builder import RefosImage
    from hil.refos.hostapp import NAME, hostapp_archive

    build = tmp_path / "build"
    tree = tmp_path / "tree" / "etc"
    tree.mkdir(parents=True)
    (tree / "os-release").write_text('VERSION="9.9.9"\n')
    rootfs = build / "rootfs.img"
    build.mkdir()
    env = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "resin-rootA", "-d", str(tree.parent),
                    str(rootfs), "32M"], check=True, env=env)
    img = RefosImage("aarch64", "9.9.9", build / "disk.img", build / "disk.img.bmap", rootfs,
                     "0" * 64, "generic-aarch64", "", {})
    out = hostapp_archive(img)
    assert out == build / "hostapp.tar"
    with tarfile.open(out) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = json.loads(outer.extractfile(manifest[0]["Config"]).read())  # type: ignore[union-attr]
        layer = outer.extractfile(manifest[0]["Layers"][0])
        assert layer is not None
        with tarfile.open(fileobj=layer) as inner:
            assert inner.getnames() == ["rootfs.img"]
            carried = inner.extractfile("rootfs.img").read()  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == [f"{NAME}:9.9.9"] and config["architecture"] == "arm64"
    # the same filesystem (the tools stamp their own run into the superblock)
    shrunk = shrink_rootfs(rootfs, tmp_path / "shrunk")
    assert len(carried) == shrunk.stat().st_size, (
        "the hostapp's rootfs.img is not the root filesystem as hostapp-update -f gets it")
    (tmp_path / "carried.img").write_bytes(carried)
    read = subprocess.run(["debugfs", "-R", "cat /etc/os-release", str(tmp_path / "carried.img")],
                          capture_output=True, text=True, check=True, env=env)
    assert read.stdout == 'VERSION="9.9.9"\n', f"rootfs.img holds {read.stdout!r}"
    stamp = out.stat().st_mtime_ns
    assert hostapp_archive(img) == out and out.stat().st_mtime_ns == stamp, "made twice"
