"""Fixtures for the flashing tests: a small sparse disk image in every container format, and
loop block devices (skipped with a reason where losetup is not possible)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

MiB = 1 << 20
IMAGE_SIZE = 40 * MiB + 3 * 1024  # not a multiple of 4 KiB or of the 4 MiB chunk: tails matter


@dataclass(frozen=True)
class ImageFixture:
    raw: Path
    variants: dict[str, Path]  # format name -> file
    data: bytes  # the full decompressed content

    @property
    def size(self) -> int:
        return len(self.data)


def write_image(path: Path, size: int = IMAGE_SIZE, seed: int = 1) -> bytes:
    """A sparse image shaped like a disk: a boot sector, scattered data, an allocated all-zero
    block inside data, a 20 MiB run (crosses chunk and verify-run boundaries), a data tail."""
    rnd = random.Random(seed)
    content = bytearray(size)
    pieces = [(0, 64 * 1024), (MiB, 300 * 1024), (5 * MiB, 12 * 1024),
              (10 * MiB, 20 * MiB), (size - 8 * 1024, 8 * 1024)]
    with open(path, "wb") as f:
        f.truncate(size)
        pattern = rnd.randbytes(16 * 1024)  # big pieces repeat it, stamped: fast to compress
        for start, length in pieces:
            if length > MiB:
                data = b"".join(i.to_bytes(8, "little") + pattern[8:]
                                for i in range(length // len(pattern)))
            else:
                data = rnd.randbytes(length)
            content[start:start + length] = data
            f.seek(start)
            f.write(data)
        f.seek(5 * MiB + 4096)  # allocated zeros between data: zero detection must skip them
        f.write(bytes(4096))
        content[5 * MiB + 4096:5 * MiB + 8192] = bytes(4096)
    return bytes(content)


def make_variants(raw: Path, data: bytes) -> dict[str, Path]:
    out = {"raw": raw}
    out["gz"] = raw.with_name(raw.name + ".gz")
    out["gz"].write_bytes(gzip.compress(data, compresslevel=1))
    out["xz"] = raw.with_name(raw.name + ".xz")
    out["xz"].write_bytes(lzma.compress(data, preset=0))
    out["zst"] = raw.with_name(raw.name + ".zst")
    out["zst"].write_bytes(zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data))
    out["bz2"] = raw.with_name(raw.name + ".bz2")
    out["bz2"].write_bytes(bz2.compress(data, compresslevel=1))
    out["zip"] = raw.with_name(raw.stem + ".zip")
    with zipfile.ZipFile(out["zip"], "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("README.txt", "not the image\n")
        z.write(raw, raw.name)
    return out


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageFixture:
    raw = tmp_path_factory.mktemp("image") / "disk.img"
    data = write_image(raw)
    return ImageFixture(raw, make_variants(raw, data), data)


def need_root_tool(tool: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (losetup/mount)")
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


class Loops:
    """Creates loop devices and detaches exactly those at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.devices: list[str] = []

    def make(self, size: int, fill: bytes | None = None) -> str:
        need_root_tool("losetup")
        backing = self.tmp / f"loop{len(self.devices)}.img"
        with open(backing, "wb") as f:
            if fill:
                f.write((fill * (size // len(fill) + 1))[:size])
            else:
                f.truncate(size)
        result = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                                text=True, timeout=30)
        if result.returncode != 0:
            pytest.skip(f"losetup failed: {result.stderr.strip()}")
        dev = result.stdout.strip()
        self.devices.append(dev)
        return dev

    def backing(self, dev: str) -> Path:
        return self.tmp / f"loop{self.devices.index(dev)}.img"

    def detach(self, dev: str) -> None:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)

    def close(self) -> None:
        for dev in self.devices:
            name = Path(dev).name
            backing = Path(f"/sys/block/{name}/loop/backing_file")
            if backing.exists() and backing.read_text().strip().startswith(str(self.tmp)):
                self.detach(dev)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    made = Loops(tmp_path)
    yield made
    made.close()


def read_all(path: str | Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


@pytest.fixture
def progress_log() -> tuple[list[object], Callable[[object], None]]:
    seen: list[object] = []
    return seen, seen.append
