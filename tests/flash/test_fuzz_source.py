"""Compressed images, fuzzed: valid images cut short, bytes corrupted, magic changed, size
fields that lie, streams too big for the target. Each case is a real flash onto a real target
(a file, or a loop device when root): one of our errors naming the image, or the exact image
written; a target the error says was not written is byte-for-byte as it was."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hil.errors import InfraError
from hil.flash.writer import FlashReport, flash

from ..fuzzing import FUZZ, Damage, damaged, damages, flash_outcome

KiB = 1 << 10
SMALL = 256 * KiB + 100  # one 4 MiB chunk: everything is decoded before the first write
LARGE = 9 << 20  # three chunks: a cut near the end is seen after the write began


def disk_bytes(size: int, seed: int) -> bytes:
    """Data and zeros, like a disk: a boot area, scattered blocks, a tail not block-aligned."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for start in {0, 64 * KiB, size // 2, max(0, size - 100)}:
        if start < size:
            data[start:start + 6 * KiB] = rnd.randbytes(min(6 * KiB, size - start))
    return bytes(data)


def compress(fmt: str, data: bytes) -> bytes:
    if fmt == "gz":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if fmt == "xz":
        return lzma.compress(data, preset=0)
    if fmt == "zst":
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
    if fmt == "bz2":
        return bz2.compress(data, compresslevel=1)
    if fmt == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            z.writestr("disk.img", data)
        return out.getvalue()
    return data


FORMATS = ["gz", "xz", "zst", "bz2", "zip", "raw"]


def name_for(fmt: str) -> str:
    return {"raw": "disk.img", "zip": "disk.zip"}.get(fmt, f"disk.img.{fmt}")


@dataclass(repr=False)  # a failing case prints its arguments: not the image's bytes
class Bench:
    folder: Path
    data: bytes
    blobs: dict[str, bytes]
    loops: dict[str, Path]  # "small"/"large" loop devices (root only), keyed by size class


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    folder = tmp_path_factory.mktemp("fuzz-source")
    data = disk_bytes(SMALL, 1)
    loops: dict[str, Path] = {}
    for kind, size in (("smaller", 192 * KiB), ("larger", 512 * KiB)):
        backing = folder / f"{kind}.backing"
        backing.write_bytes(b"L" * size)
        made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                              text=True, timeout=30)
        if made.returncode == 0:
            loops[kind] = Path(made.stdout.strip())
    yield Bench(folder, data, {fmt: compress(fmt, data) for fmt in FORMATS}, loops)
    for dev in loops.values():
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True, timeout=30)


def check_flash(bench: Bench, fmt: str, blob: bytes, target_kind: str, expected: bytes
                ) -> FlashReport | Exception:
    image = bench.folder / name_for(fmt)
    image.write_bytes(blob)
    target = bench.folder / "target.img"
    if target_kind in bench.loops:
        target = bench.loops[target_kind]
    elif target_kind == "new file":
        target.unlink(missing_ok=True)
    else:
        target.write_bytes(b"T" * (300 * KiB))
    result = flash_outcome(lambda: flash(image, target, allow_fixed=True, display=False),
                           [image], target, [image])
    if isinstance(result, FlashReport):  # accepted: then it is the image, exactly
        with open(target, "rb") as f:
            assert f.read(len(expected)) == expected
    return result


targets = st.sampled_from(["file", "new file", "smaller", "larger"])


@FUZZ
@given(fmt=st.sampled_from(FORMATS), ops=damages, target_kind=targets)
# the xz footer check read 12 bytes before a file shorter than that: OSError from seek
@example(fmt="xz", ops=[("cut", 10, b"")], target_kind="file")
# a zip whose end record claims a larger central directory: a negative seek inside zipfile
@example(fmt="zip", ops=[("put", -10, b"\xff\xff\x00\x00")], target_kind="file")
# a stream corrupt from its first block used to truncate the target file all the same
@example(fmt="gz", ops=[("put", 10, b"\xff" * 12)], target_kind="file")
# ... and to leave a new, empty target file behind
@example(fmt="zst", ops=[("put", 12, b"\xff" * 12)], target_kind="new file")
def test_damaged_image_is_refused_or_written_exactly(bench: Bench, fmt: str, ops: list[Damage],
                                                     target_kind: str) -> None:
    blob = damaged(bench.blobs[fmt], ops)
    check_flash(bench, fmt, blob, target_kind, blob if fmt == "raw" else bench.data)


@settings(FUZZ, max_examples=300)  # on top of the 1000 above
@given(fmt=st.sampled_from(["gz", "bz2", "zst"]), size=st.integers(1, 600 * KiB),
       lie=st.integers(0, 1 << 32), target_kind=targets)
# a gzip whose trailer says less than the stream holds, going past the end of the device:
# refused before anything is written, not at the first write past the end
@example(fmt="gz", size=300 * KiB, lie=1000, target_kind="smaller")
def test_stream_too_big_or_too_small_for_its_target(bench: Bench, fmt: str, size: int, lie: int,
                                                    target_kind: str) -> None:
    """A valid stream of any size, with the size its header or trailer records changed."""
    data = disk_bytes(size, size)
    blob = bytearray(compress(fmt, data))
    if fmt == "gz":  # ISIZE, the last 4 bytes
        blob[-4:] = (lie % (1 << 32)).to_bytes(4, "little")
    elif fmt == "zst" and blob[4] >> 6:  # the frame content size field (FCS), when present
        fcs_len = (1, 2, 4, 8)[blob[4] >> 6]
        start = 4 + 1 + (0 if blob[4] >> 5 & 1 else 1)
        blob[start:start + fcs_len] = (lie % (1 << 8 * fcs_len)).to_bytes(fcs_len, "little")
    result = check_flash(bench, fmt, bytes(blob), target_kind, data)
    if target_kind == "smaller" and target_kind in bench.loops and len(data) > 192 * KiB:
        assert isinstance(result, InfraError)


@settings(FUZZ, max_examples=40)
@given(fmt=st.sampled_from(["gz", "bz2", "xz", "zst"]), keep=st.floats(0.55, 0.999),
       new_target=st.booleans())
def test_image_cut_short_found_after_the_write_began(tmp_path_factory: pytest.TempPathFactory,
                                                      fmt: str, keep: float,
                                                      new_target: bool) -> None:
    """A stream cut off past its first 4 MiB: gzip only shows it at the cut, when the first
    chunks are written. The flash fails naming the image and says the target must be flashed
    again (bmaptool's behaviour); a target file it created is removed. xz and zstd are
    refused before writing (their index and frame headers are read first); bzip2 holds this
    mostly empty image in one block, so the cut is seen before anything is written."""
    folder = tmp_path_factory.getbasetemp() / "fuzz-cut"
    folder.mkdir(exist_ok=True)
    blob = _large(fmt)
    image = folder / name_for(fmt)
    image.write_bytes(blob[:int(len(blob) * keep)])
    target = folder / "target.img"
    target.unlink(missing_ok=True)
    if not new_target:
        target.write_bytes(b"T" * 4096)
    result = flash_outcome(lambda: flash(image, target, display=False), [image], target,
                           [image])
    assert isinstance(result, InfraError)
    if not new_target and fmt == "gz":
        assert "holds an incomplete or unverified image" in str(result)


_LARGE: dict[str, bytes] = {}


def _large(fmt: str) -> bytes:
    if fmt not in _LARGE:
        _LARGE[fmt] = compress(fmt, disk_bytes(LARGE, 2))
    return _LARGE[fmt]
