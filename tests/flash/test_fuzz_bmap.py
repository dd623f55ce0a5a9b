""".bmap files, fuzzed: malformed XML, wrong checksums, ranges past the image end, overlapping
or reversed ranges, wrong block sizes, missing fields. Each case is a real flash of a raw or
gzip image with that bmap onto a target file: one of our errors naming the bmap or the image,
or the mapped ranges written exactly; a target the error says was not written is unchanged."""

from __future__ import annotations

import gzip
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hil.flash.bmap import bmap_xml, create_bmap, parse_bmap
from hil.flash.writer import FlashReport, flash

from ..fuzzing import FUZZ, Damage, damaged, damages, flash_outcome

BLOCK = 4096
SIZE = 16 * BLOCK + 100  # the last block is cut short


@dataclass(repr=False)  # a failing case prints its arguments: not the image's bytes
class Bench:
    folder: Path
    data: bytes
    images: dict[str, Path]  # "raw", "gz"
    xml: str  # the image's valid bmap


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    folder = tmp_path_factory.mktemp("fuzz-bmap")
    rnd = random.Random(3)
    data = bytearray(SIZE)
    for first, count in ((0, 2), (5, 1), (7, 3), (15, 2)):  # four ranges, holes between
        data[first * BLOCK:(first + count) * BLOCK] = rnd.randbytes(count * BLOCK)
    raw = folder / "disk.img"
    with open(raw, "wb") as f:  # sparse, so the bmap maps the data blocks only
        f.truncate(SIZE)
        for first, count in ((0, 2), (5, 1), (7, 3), (15, 2)):
            f.seek(first * BLOCK)
            f.write(data[first * BLOCK:(first + count) * BLOCK])
    gz = folder / "disk.img.gz"
    gz.write_bytes(gzip.compress(bytes(data), mtime=0))
    return Bench(folder, bytes(data), {"raw": raw, "gz": gz}, bmap_xml(create_bmap(raw)))


FIELDS = ["ImageSize", "BlockSize", "BlocksCount", "MappedBlocksCount", "ChecksumType",
          "BmapFileChecksum", "BlockMap"]
values = st.one_of(st.integers(-3, 1 << 70).map(str), st.text(max_size=10),
                   st.sampled_from(["0", "1", "512", "4096", "8192", "17", "sha1", "sha256",
                                    "md5", "shake_128", "SHA256", "٤٠٩٦", "1_0", " "]))
ranges = st.lists(st.tuples(st.integers(-1, 20), st.integers(-1, 20),
                            st.sampled_from(["right", "wrong", "short", "nonhex", "upper",
                                             "none"])), max_size=6)
edits = st.one_of(
    st.tuples(st.just("text"), damages),  # malformed XML
    st.tuples(st.just("field"), st.sampled_from(FIELDS), values),  # wrong values
    st.tuples(st.just("drop"), st.sampled_from(FIELDS)),  # missing fields
    st.tuples(st.just("version"), values),
    st.tuples(st.just("ranges"), ranges),  # past the end, reversed, overlapping, bad sums
)


def edited(bench: Bench, edit: tuple[object, ...], keep_file_sum: bool) -> str:
    xml = bench.xml if keep_file_sum else re.sub(r"\s*<BmapFileChecksum>.*?</BmapFileChecksum>",
                                                 "", bench.xml)
    kind = edit[0]
    if kind == "text":
        ops: list[Damage] = edit[1]  # type: ignore[assignment]
        return damaged(xml.encode(), ops).decode("utf-8", errors="surrogateescape")
    if kind == "field":
        tag, value = edit[1], edit[2]
        return re.sub(rf"<{tag}>.*?</{tag}>", lambda _: f"<{tag}> {value} </{tag}>", xml,
                      flags=re.S)
    if kind == "drop":
        return re.sub(rf"\s*<{edit[1]}>.*?</{edit[1]}>", "", xml, flags=re.S)
    if kind == "version":
        return xml.replace('version="2.0"', f'version="{edit[1]}"', 1)
    body = []
    for first, last, sum_kind in edit[1]:  # type: ignore[attr-defined]
        lo, hi = min(first, last), max(first, last)
        right = hashlib.sha256(bench.data[lo * BLOCK:(hi + 1) * BLOCK]).hexdigest()
        chksum = {"right": right, "wrong": right[::-1], "short": right[:10],
                  "nonhex": "g" * 64, "upper": right.upper(), "none": None}[sum_kind]
        attr = f' chksum="{chksum}"' if chksum else ""
        body.append(f"<Range{attr}> {first}-{last} </Range>")
    return re.sub(r"<BlockMap>.*</BlockMap>", lambda _: "<BlockMap>" + "".join(body)
                  + "</BlockMap>", xml, flags=re.S)


@FUZZ
@given(edit=edits, keep_file_sum=st.booleans(), fmt=st.sampled_from(["raw", "gz"]),
       new_target=st.booleans())
# a ChecksumType hashlib knows but without a fixed length: TypeError from hexdigest()
@example(edit=("field", "ChecksumType", "shake_128"), keep_file_sum=False, fmt="raw",
         new_target=False)
# a range checksum of the right length that is not hex: ValueError mid-write
@example(edit=("ranges", [(0, 1, "nonhex")]), keep_file_sum=False, fmt="raw", new_target=False)
# digits of another script, and int()'s underscores, were read as numbers
@example(edit=("field", "BlockSize", "٤٠٩٦"), keep_file_sum=False, fmt="raw", new_target=False)
@example(edit=("version", "1.-3"), keep_file_sum=False, fmt="raw", new_target=False)
# a bmap for a smaller image than gzip's trailer records is refused before writing
@example(edit=("field", "ImageSize", "8192"), keep_file_sum=False, fmt="gz", new_target=False)
def test_bad_bmap_is_refused_or_its_ranges_written(bench: Bench, edit: tuple[object, ...],
                                                  keep_file_sum: bool, fmt: str,
                                                  new_target: bool) -> None:
    bmap = bench.folder / "disk.img.bmap"
    bmap.write_bytes(edited(bench, edit, keep_file_sum).encode("utf-8", "surrogateescape"))
    image = bench.images[fmt]
    target = bench.folder / "target.img"
    target.unlink(missing_ok=True)
    if not new_target:
        target.write_bytes(b"T" * (SIZE + 5000))
    result = flash_outcome(lambda: flash(image, target, bmap=bmap, display=False),
                           [image, bmap], target, [image, bmap])
    if isinstance(result, FlashReport):  # accepted: every range it maps is the image's
        written = target.read_bytes()
        bm = parse_bmap(bmap)
        for r in bm.ranges:
            start, end = bm.byte_range(r)
            assert written[start:end] == bench.data[start:end]
