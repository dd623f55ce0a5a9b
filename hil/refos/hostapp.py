"""The reference OS's update as a container image, as balenaOS delivers host OS updates: a
"hostapp" that ``hostapp-update -i <image>`` pulls from a registry.

Its one layer holds ``rootfs.img``, the root filesystem image ``hostapp-update -f`` takes,
shrunk to its content (balenaOS's hostapp holds the root's files instead: the reference OS
writes a raw filesystem into the inactive root, and the device has no room to unpack one).
The device fetches the compressed layer with its engine's containerd and unpacks it as it
writes it (``usr/lib/hil/hostapp-fetch``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hil.os.transfer import shrink_rootfs
from hil.refos.appimage import deb_arch, docker_archive
from hil.refos.builder import RefosImage

NAME = "hil/refos-hostapp"


def hostapp_archive(img: RefosImage) -> Path:
    """``img``'s update as a ``docker save`` archive tagged ``hil/refos-hostapp:<version>``,
    kept beside the build in its cache (made on first use: most sessions never need it)."""
    out = img.directory / "hostapp.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=img.directory, prefix=".hostapp.") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        shrink_rootfs(img.rootfs, Path(tmp) / "shrink").rename(root / "rootfs.img")
        staged = Path(tmp) / "hostapp.tar"
        docker_archive(root, f"{NAME}:{img.version}", deb_arch(img.arch), staged,
                       created_by=f"pytest-hil reference OS {img.version} ({img.key[:12]})",
                       cmd=["/bin/true"])
        staged.rename(out)
    return out
