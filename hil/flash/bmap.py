"""bmaptool block maps: parse (format 1.x and 2.x) and create (so our own images ship one).

A bmap lists the block ranges of an image that hold data; everything else need not be written.
Format 1.3 carries SHA-1 range checksums (``sha1=``), 1.4/2.0 name the type in ``ChecksumType``
(``chksum=``); 1.0-1.2 have none. The file's own checksum is computed with its value zeroed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

from hil.errors import ConfigError, InfraError

SUPPORTED_MAJOR = 2
CHECKSUM_TYPES = ("sha1", "sha256")  # what bmaptool writes
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() would take "1_0" and other scripts' digits
_HEX = re.compile(r"[0-9a-fA-F]+")


def _number(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError(text)
    return int(text)


# NamedTuple rather than dataclass: `hil flash` starts without importing dataclasses (~10 ms)
class BmapRange(NamedTuple):
    first: int  # first block
    last: int  # last block, inclusive (bmaptool's convention)
    checksum: str | None


class Bmap(NamedTuple):
    image_size: int
    block_size: int
    ranges: tuple[BmapRange, ...]
    checksum_type: str | None = "sha256"
    version: str = "2.0"
    source: str = "<bmap>"  # file name, for error messages

    @property
    def blocks_count(self) -> int:
        return (self.image_size + self.block_size - 1) // self.block_size

    @property
    def mapped_blocks(self) -> int:
        return sum(r.last - r.first + 1 for r in self.ranges)

    @property
    def mapped_bytes(self) -> int:
        return sum(end - start for start, end in map(self.byte_range, self.ranges))

    def byte_range(self, r: BmapRange) -> tuple[int, int]:
        """[start, end) in bytes; the last block may be cut short by the image size."""
        return r.first * self.block_size, min((r.last + 1) * self.block_size, self.image_size)

    def describe(self, r: BmapRange) -> str:
        start, end = self.byte_range(r)
        return f"bmap range {r.first}-{r.last} (bytes {start}-{end - 1}) of {self.source}"


def _text(root: ET.Element, tag: str, source: str, required: bool = True) -> str | None:
    node = root.find(tag)
    if node is None or node.text is None:
        if required:
            raise ConfigError(f"missing <{tag}>", file=source)
        return None
    return node.text.strip()


def _int(root: ET.Element, tag: str, source: str) -> int:
    text = _text(root, tag, source)
    try:
        return _number(text or "")
    except ValueError:
        raise ConfigError(f"<{tag}> is {text!r}, expected an integer", file=source) from None


def parse_bmap(path: str | os.PathLike[str]) -> Bmap:
    """Read and validate a .bmap file (its own checksum, ranges inside the image)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read bmap: {exc.strerror}", file=source) from exc
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise ConfigError(f"not valid XML: {exc}", file=source) from exc
    if root.tag != "bmap":
        raise ConfigError(f"root element is <{root.tag}>, expected <bmap>", file=source)
    version = root.get("version", "")
    try:
        major, minor = (_number(x) for x in version.split(".", 1))
    except ValueError:
        raise ConfigError(f"version {version!r} is not 'major.minor'", file=source) from None
    if major > SUPPORTED_MAJOR:
        raise ConfigError(f"bmap format {version} is newer than the supported "
                          f"{SUPPORTED_MAJOR}.x", file=source)
    image_size = _int(root, "ImageSize", source)
    block_size = _int(root, "BlockSize", source)
    if block_size <= 0 or image_size < 0:
        raise ConfigError(f"BlockSize {block_size} / ImageSize {image_size} invalid",
                          file=source)
    blocks_count = _int(root, "BlocksCount", source)
    if blocks_count != (image_size + block_size - 1) // block_size:
        raise ConfigError(f"BlocksCount {blocks_count} does not match ImageSize {image_size} "
                          f"/ BlockSize {block_size}", file=source)

    # 1.4 was a misnumbered 2.0 (bmap-tools 3.0); 1.3 had SHA-1 only; older had no checksums
    if major >= 2 or (major == 1 and minor >= 4):
        cs_type: str | None = (_text(root, "ChecksumType", source) or "").lower()
        attr, file_tag = "chksum", "BmapFileChecksum"
    elif major == 1 and minor == 3:
        cs_type, attr, file_tag = "sha1", "sha1", "BmapFileSHA1"
    else:
        cs_type, attr, file_tag = None, "", ""
    if cs_type is not None:
        if cs_type not in CHECKSUM_TYPES:
            raise ConfigError(f"unknown ChecksumType {cs_type!r}; expected one of "
                              f"{', '.join(CHECKSUM_TYPES)}", file=source)
        cs_len = len(hashlib.new(cs_type).hexdigest())
        file_sum = _text(root, file_tag, source, required=False)
        if file_sum:
            _check_file_checksum(raw, file_sum, cs_type, source)

    block_map = root.find("BlockMap")
    if block_map is None:
        raise ConfigError("missing <BlockMap>", file=source)
    ranges: list[BmapRange] = []
    prev_last = -1
    for elem in block_map.findall("Range"):
        text = (elem.text or "").strip()
        try:
            first_s, _, last_s = text.partition("-")
            first = _number(first_s.strip())
            last = _number(last_s.strip()) if last_s.strip() else first
        except ValueError:
            raise ConfigError(f"bad <Range> {text!r}", file=source) from None
        if not prev_last < first <= last < blocks_count:
            raise ConfigError(f"<Range> {text!r} is out of order or outside the "
                              f"{blocks_count} blocks of the image", file=source)
        checksum = elem.get(attr) if attr else None
        if checksum is not None and (cs_type is None or len(checksum) != cs_len
                                     or not _HEX.fullmatch(checksum)):
            raise ConfigError(f"<Range> {text!r} has a malformed {cs_type} checksum",
                              file=source)
        ranges.append(BmapRange(first, last, checksum.lower() if checksum else None))
        prev_last = last
    return Bmap(image_size, block_size, tuple(ranges), cs_type, version, source)


def _check_file_checksum(raw: bytes, expected: str, cs_type: str, source: str) -> None:
    pos = raw.find(expected.encode())
    zeroed = raw[:pos] + b"0" * len(expected) + raw[pos + len(expected):]
    actual = hashlib.new(cs_type, zeroed).hexdigest()
    if actual != expected:
        raise ConfigError(f"the bmap file's own {cs_type} is {actual}, but it says {expected}: "
                          "the file was edited or damaged", file=source)


def data_extents(fd: int, size: int, block_size: int) -> list[tuple[int, int]]:
    """Allocated [first, last] block ranges from SEEK_DATA/SEEK_HOLE, rounded out to blocks."""
    blocks: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            start, end = pos, size  # no SEEK_DATA on this filesystem: all of it is data
        first, last = start // block_size, (end - 1) // block_size
        if blocks and first <= blocks[-1][1] + 1:
            blocks[-1] = (blocks[-1][0], max(last, blocks[-1][1]))
        else:
            blocks.append((first, last))
        pos = end
    return blocks


def _read(fd: int, view: memoryview, pos: int, end: int, path: Path) -> memoryview:
    """The bytes at [pos, end), at most ``len(view)`` of them."""
    n = os.preadv(fd, [view[: min(len(view), end - pos)]], pos)
    if n <= 0:
        raise InfraError(f"{path}: short read at offset {pos}", part="flash")
    return view[:n]


def _nonzero_blocks(fd: int, extent: tuple[int, int], block_size: int, size: int,
                    view: memoryview, path: Path) -> list[tuple[int, int]]:
    """The [first, last] block ranges of ``extent`` that hold a non-zero byte."""
    from hil.flash.pipeline import nonzero_runs

    spans: list[tuple[int, int]] = []
    pos, end = extent[0] * block_size, min((extent[1] + 1) * block_size, size)
    while pos < end:
        data = _read(fd, view, pos, end, path)
        for start, stop in nonzero_runs(data, pos, block_size):
            first, last = start // block_size, (stop - 1) // block_size
            if spans and spans[-1][1] + 1 == first:
                spans[-1] = (spans[-1][0], last)
            else:
                spans.append((first, last))
        pos += len(data)
    return spans


def create_bmap(image: str | os.PathLike[str], *, block_size: int = 4096,
                checksum_type: str = "sha256", zero_blocks: bool = True) -> Bmap:
    """Block map of a raw image file, from its holes; ranges carry checksums.
    ``zero_blocks=False`` also leaves out allocated blocks that hold only zeros: the map then
    depends on the content alone, not on how the host's filesystem stored the file (the same
    map for the same bytes, as a reproducible build needs)."""
    path = Path(image)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise InfraError(f"{path}: empty image, nothing to map", part="flash")
        ranges: list[BmapRange] = []
        view = memoryview(bytearray(4 << 20))  # a multiple of any block size in use
        for extent in data_extents(fd, size, block_size):
            spans = ([extent] if zero_blocks
                     else _nonzero_blocks(fd, extent, block_size, size, view, path))
            for first, last in spans:
                digest = hashlib.new(checksum_type)
                pos, end = first * block_size, min((last + 1) * block_size, size)
                while pos < end:
                    data = _read(fd, view, pos, end, path)
                    digest.update(data)
                    pos += len(data)
                ranges.append(BmapRange(first, last, digest.hexdigest()))
    finally:
        os.close(fd)
    return Bmap(size, block_size, tuple(ranges), checksum_type, "2.0", str(path))


def bmap_xml(bmap: Bmap) -> str:
    """bmaptool-compatible 2.0 XML, including the file checksum bmaptool verifies."""
    cs_type = bmap.checksum_type or "sha256"
    zero_sum = "0" * len(hashlib.new(cs_type).hexdigest())
    percent = 100.0 * bmap.mapped_blocks / max(1, bmap.blocks_count)
    lines = [
        '<?xml version="1.0" ?>',
        "<!-- Block map written by pytest-hil (hil.flash.bmap); bmaptool format 2.0 -->",
        '<bmap version="2.0">',
        f"    <ImageSize> {bmap.image_size} </ImageSize>",
        f"    <BlockSize> {bmap.block_size} </BlockSize>",
        f"    <BlocksCount> {bmap.blocks_count} </BlocksCount>",
        f"    <!-- Count of mapped blocks: {percent:.1f}% -->",
        f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>",
        f"    <ChecksumType> {cs_type} </ChecksumType>",
        f"    <BmapFileChecksum> {zero_sum} </BmapFileChecksum>",
        "    <BlockMap>",
    ]
    for r in bmap.ranges:
        span = f"{r.first}-{r.last}" if r.last != r.first else str(r.first)
        attr = f' chksum="{r.checksum}"' if r.checksum else ""
        lines.append(f"        <Range{attr}> {span} </Range>")
    lines += ["    </BlockMap>", "</bmap>", ""]
    text = "\n".join(lines)
    digest = hashlib.new(cs_type, text.encode()).hexdigest()
    return text.replace(f"<BmapFileChecksum> {zero_sum} ", f"<BmapFileChecksum> {digest} ", 1)


def write_bmap(bmap: Bmap, out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(bmap_xml(bmap))
    tmp.replace(path)
    return path
