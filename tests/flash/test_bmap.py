"""Block maps: ours round-trip and interoperate with bmaptool; damaged ones are refused."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hil.errors import ConfigError
from hil.flash.bmap import Bmap, BmapRange, bmap_xml, create_bmap, parse_bmap, write_bmap

from .conftest import ImageFixture, read_all


def test_create_maps_the_data_and_round_trips(image: ImageFixture, tmp_path: Path) -> None:
    bmap = create_bmap(image.raw)
    assert bmap.image_size == image.size and bmap.block_size == 4096
    for r in bmap.ranges:  # every mapped range checksums what the image holds there
        start, end = bmap.byte_range(r)
        assert r.checksum == hashlib.sha256(image.data[start:end]).hexdigest()
    mapped = bytearray(image.size)
    for r in bmap.ranges:
        start, end = bmap.byte_range(r)
        mapped[start:end] = image.data[start:end]
    assert bytes(mapped) == image.data  # nothing outside the ranges is non-zero
    assert bmap.mapped_bytes < image.size - 15 * (1 << 20)  # holes are unmapped
    path = write_bmap(bmap, tmp_path / "disk.bmap")
    again = parse_bmap(path)
    assert (again.ranges, again.image_size, again.checksum_type) == (
        bmap.ranges, bmap.image_size, "sha256")


def test_bmaptool_accepts_ours_and_we_read_bmaptools(image: ImageFixture,
                                                     tmp_path: Path) -> None:
    if shutil.which("bmaptool") is None:
        pytest.skip("bmaptool (bmap-tools) is not installed")
    ours = write_bmap(create_bmap(image.raw), tmp_path / "ours.bmap")
    out = tmp_path / "copy.img"
    subprocess.run(["bmaptool", "-q", "copy", "--bmap", str(ours), str(image.raw), str(out)],
                   check=True, timeout=120)
    assert read_all(out, image.size + 1) == image.data
    theirs = tmp_path / "theirs.bmap"
    subprocess.run(["bmaptool", "-q", "create", "-o", str(theirs), str(image.raw)], check=True,
                   timeout=120)
    assert parse_bmap(theirs).ranges == create_bmap(image.raw).ranges


def _v13(image: ImageFixture, tamper: bool = False) -> str:
    """A format 1.3 bmap (SHA-1, ``sha1=`` attributes, ``BmapFileSHA1``), written by hand."""
    bs, size = 4096, image.size
    ranges = [(0, 15), (256, 330)]
    body = "".join(f'<Range sha1="{hashlib.sha1(image.data[a * bs:(b + 1) * bs]).hexdigest()}">'
                   f" {a}-{b} </Range>\n" for a, b in ranges)
    text = (f'<?xml version="1.0" ?>\n<bmap version="1.3">\n<ImageSize> {size} </ImageSize>\n'
            f"<BlockSize> {bs} </BlockSize>\n<BlocksCount> {-(-size // bs)} </BlocksCount>\n"
            f"<MappedBlocksCount> 91 </MappedBlocksCount>\n<BmapFileSHA1> {'0' * 40} "
            f"</BmapFileSHA1>\n<BlockMap>\n{body}</BlockMap>\n</bmap>\n")
    digest = hashlib.sha1(text.encode()).hexdigest()
    if tamper:
        text = text.replace("<MappedBlocksCount> 91", "<MappedBlocksCount> 92")
    return text.replace("0" * 40, digest)


def test_format_1_3_sha1(image: ImageFixture, tmp_path: Path) -> None:
    path = tmp_path / "old.bmap"
    path.write_text(_v13(image))
    bmap = parse_bmap(path)
    assert bmap.checksum_type == "sha1" and bmap.version == "1.3"
    assert [(r.first, r.last) for r in bmap.ranges] == [(0, 15), (256, 330)]
    path.write_text(_v13(image, tamper=True))
    with pytest.raises(ConfigError, match=r"old\.bmap: the bmap file's own sha1 is"):
        parse_bmap(path)


@pytest.mark.parametrize("mutate,message", [
    (lambda t: re.sub(r"<BlocksCount> \d+", "<BlocksCount> 3", t), "BlocksCount 3 does not"),
    (lambda t: t.replace('version="2.0"', 'version="3.0"'), "newer than the supported"),
    (lambda t: t.replace("</bmap>", ""), "not valid XML"),
])
def test_malformed_bmaps_are_config_errors(image: ImageFixture, tmp_path: Path, mutate: object,
                                           message: str) -> None:
    text = bmap_xml(create_bmap(image.raw))
    path = tmp_path / "bad.bmap"
    path.write_text(mutate(text))  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message) as err:
        parse_bmap(path)
    assert "bad.bmap" in str(err.value)


def test_ranges_must_be_ordered_and_inside(tmp_path: Path) -> None:
    bmap = Bmap(8192, 4096, (BmapRange(1, 1, None), BmapRange(0, 0, None)), None)
    path = tmp_path / "order.bmap"
    path.write_text(bmap_xml(bmap))
    with pytest.raises(ConfigError, match="out of order"):
        parse_bmap(path)


def test_without_zero_blocks_the_map_follows_the_content_alone(tmp_path: Path) -> None:
    bs = 4096
    data = bytearray(64 * bs)
    data[3 * bs + 100:3 * bs + 110] = b"x" * 10
    data[10 * bs:12 * bs] = b"y" * (2 * bs)
    data[-1] = 1
    dense = tmp_path / "dense.img"
    dense.write_bytes(data)  # every block allocated, the zero ones too
    sparse = tmp_path / "sparse.img"
    with sparse.open("wb") as f:  # only the non-zero blocks allocated
        f.truncate(len(data))
        for first, last in ((3, 3), (10, 11), (63, 63)):
            f.seek(first * bs)
            f.write(data[first * bs:(last + 1) * bs])
    assert [(r.first, r.last) for r in create_bmap(dense).ranges] == [(0, 63)]
    for image in (dense, sparse):
        bmap = create_bmap(image, zero_blocks=False)
        assert [(r.first, r.last) for r in bmap.ranges] == [(3, 3), (10, 11), (63, 63)]
        for r in bmap.ranges:
            start, end = bmap.byte_range(r)
            assert r.checksum == hashlib.sha256(data[start:end]).hexdigest()
