"""App images (hil/refos/appimage.py) built from Debian packages: byte for byte the same on
every build, and the gpiod one holding libgpiod's tools with every library they need."""

from __future__ import annotations

import io
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
