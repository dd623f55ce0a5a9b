"""Decompressing reader: every format yields the exact bytes; damage is a clear error."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from hil.errors import InfraError
from hil.flash.source import detect_format, open_source

from .conftest import ImageFixture


def read_through(path: Path, chunk: int = 4 << 20) -> bytes:
    out = bytearray()
    view = memoryview(bytearray(chunk))
    with open_source(path) as src:
        while True:
            n = src.readinto(view)
            out += view[:n]
            if n < chunk:
                break
    return bytes(out)


@pytest.mark.parametrize("fmt", ["raw", "gz", "xz", "zst", "bz2", "zip"])
def test_every_format_gives_the_image_bytes(image: ImageFixture, fmt: str) -> None:
    assert read_through(image.variants[fmt]) == image.data


@pytest.mark.parametrize("fmt,exact", [("raw", True), ("xz", True), ("zst", True),
                                       ("zip", True), ("gz", False)])
def test_sizes_known_before_reading(image: ImageFixture, fmt: str, exact: bool) -> None:
    with open_source(image.variants[fmt]) as src:
        assert src.min_size == image.size  # gzip: ISIZE is exact below 4 GiB
        assert src.size == (image.size if exact else None)


def test_format_is_detected_by_content_not_name(image: ImageFixture, tmp_path: Path) -> None:
    misnamed = tmp_path / "disk.img"  # a zstd file without the suffix
    shutil.copy(image.variants["zst"], misnamed)
    with open_source(misnamed) as src:
        assert src.format == "zstd"
    assert detect_format(b"\x1f\x8b\x08") == "gzip"
    assert detect_format(b"\xeb\x3c\x90mkfs.fat") == "raw"


def test_suffix_claiming_compression_over_raw_content_is_refused(image: ImageFixture,
                                                                tmp_path: Path) -> None:
    fake = tmp_path / "disk.img.gz"
    shutil.copy(image.raw, fake)
    with pytest.raises(InfraError, match=r"disk\.img\.gz: the name says gzip but the content "
                       r"is raw"):
        open_source(fake)


def test_concatenated_members_and_streams(image: ImageFixture, tmp_path: Path) -> None:
    half = len(image.data) // 2
    gz = tmp_path / "multi.img.gz"  # pigz-style multi-member gzip
    gz.write_bytes(gzip.compress(image.data[:half]) + gzip.compress(image.data[half:]))
    assert read_through(gz) == image.data
    xz = tmp_path / "multi.img.xz"  # two xz streams with stream padding between them
    xz.write_bytes(lzma.compress(image.data[:half], preset=0) + bytes(8) +
                   lzma.compress(image.data[half:], preset=0))
    with open_source(xz) as src:
        assert src.size == len(image.data)
    assert read_through(xz) == image.data


def test_zstd_multiframe_skippable_and_unknown_size(image: ImageFixture, tmp_path: Path) -> None:
    half = len(image.data) // 2
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    streamed = zstandard.ZstdCompressor().compressobj()  # no content size in the header
    second = streamed.compress(image.data[half:]) + streamed.flush()
    path = tmp_path / "multi.img.zst"
    path.write_bytes(skippable + zstandard.ZstdCompressor().compress(image.data[:half]) + second)
    with open_source(path) as src:
        assert src.size is None
    assert read_through(path, chunk=1 << 20) == image.data


@pytest.mark.parametrize("fmt", ["gz", "xz", "zst", "bz2", "zip"])
def test_truncated_image_names_file_and_offset(image: ImageFixture, tmp_path: Path,
                                               fmt: str) -> None:
    src = image.variants[fmt]
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    with pytest.raises(InfraError) as err:
        read_through(cut)
    text = str(err.value)
    assert str(cut) in text
    if fmt == "zip":
        assert "central directory" in text
    else:
        assert "truncated" in text and "offset" in text


@pytest.mark.parametrize("fmt", ["gz", "xz", "zst", "bz2", "zip"])
def test_corrupt_image_names_file_and_offset(image: ImageFixture, tmp_path: Path, fmt: str) -> None:
    src = image.variants[fmt]
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    bad = tmp_path / src.name
    bad.write_bytes(bytes(data))
    with pytest.raises(InfraError, match=r"corrupt .*decompressed offset \d+") as err:
        read_through(bad)
    assert str(bad) in str(err.value)


def test_xz_cli_multithreaded_output(image: ImageFixture, tmp_path: Path) -> None:
    if shutil.which("xz") is None:
        pytest.skip("xz not installed")
    raw = tmp_path / "mt.img"
    shutil.copy(image.raw, raw)
    subprocess.run(["xz", "-T2", "--block-size=8MiB", "-0", str(raw)], check=True, timeout=120)
    assert read_through(tmp_path / "mt.img.xz") == image.data


def test_raw_extents_follow_holes(image: ImageFixture) -> None:
    with open_source(image.raw) as src:
        extents = src.data_extents()
    assert extents is not None
    covered = sum(e - s for s, e in extents)
    assert covered < image.size - 15 * (1 << 20)  # the holes are not listed
    assert os.path.getsize(image.raw) == image.size
