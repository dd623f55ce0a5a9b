"""Shrinking a root filesystem image before it is sent: its content plus headroom, and never
larger than the source, which is what fits the device's root partition."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hil.os import transfer

MKE2FS = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
pytestmark = pytest.mark.skipif(MKE2FS is None, reason="needs e2fsprogs")


def _image(tmp_path: Path, content_mib: int, size_mib: int = 64) -> Path:
    src = tmp_path / "content"
    src.mkdir()
    (src / "payload").write_bytes(os.urandom(content_mib << 20))
    image = tmp_path / "rootfs.img"
    assert MKE2FS is not None
    subprocess.run([MKE2FS, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-d", str(src),
                    str(image), f"{size_mib}M"], check=True)
    return image


def test_a_roomy_filesystem_shrinks_to_its_content_plus_headroom(tmp_path: Path) -> None:
    image = _image(tmp_path, 8)
    out = transfer.shrink_rootfs(image, tmp_path / "work")
    # the content, the headroom and ext4's own metadata: well under the 64 MiB source
    assert (8 << 20) + transfer.HEADROOM < out.stat().st_size < image.stat().st_size // 2
    assert transfer.shrink_rootfs(image, tmp_path / "work") == out  # cached


def test_a_nearly_full_filesystem_is_never_grown(tmp_path: Path) -> None:
    image = _image(tmp_path, 58)
    out = transfer.shrink_rootfs(image, tmp_path / "work")
    assert out.stat().st_size <= image.stat().st_size, (
        "the shrunk image is larger than the source: it would not fit the root partition")
