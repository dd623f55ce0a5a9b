"""An image as it travels to a bench host over SSH: only its data, so a 2 GiB card image whose
data is a few hundred MiB costs a few hundred MiB on the wire.

The stream is a JSON header line (``size``: the image's bytes, or null when only its end
tells; ``bmap``: the bmap's length), the bmap's bytes, then frames: ``offset`` and ``length``
(two big-endian u64) and that many bytes of the image, in ascending order; a frame of length 0
ends it at its offset (the image's size). On the bench host ``StreamedImage`` turns it back
into an ``ImageSource`` whose gaps read as zeros, for ``hil.flash.writer.flash``: the one
writer (bmap ranges, verify) writes it as it writes a local file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from hil.errors import InfraError
from hil.flash.bmap import parse_bmap
from hil.flash.pipeline import CHUNK, nonzero_runs
from hil.flash.source import ImageSource, open_source

FRAME = struct.Struct(">QQ")
PIECE = 1 << 20  # bytes per frame: small enough that a channel's window keeps moving


def _data(src: ImageSource, bmap: Path | None) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the image's data: the bmap's ranges or the file's extents (a raw
    image), else the non-zero blocks as it decompresses."""
    if src.seekable:
        assert src.size is not None
        if bmap is not None:
            bm = parse_bmap(bmap)
            extents = [bm.byte_range(r) for r in bm.ranges]
        else:
            extents = src.data_extents() or [(0, src.size)]
        buf = bytearray(PIECE)
        for start, end in extents:
            for pos in range(start, end, PIECE):
                view = memoryview(buf)[: min(PIECE, end - pos)]
                n = src.pread(view, pos)
                yield pos, bytes(view[:n])
        return
    buf = bytearray(CHUNK)
    offset = 0
    while n := src.readinto(memoryview(buf)):
        view = memoryview(buf)[:n]
        for s, e in nonzero_runs(view, offset):
            yield s, bytes(view[s - offset: e - offset])
        offset += n


def send(image: Path, bmap: Path | None, write: Callable[[bytes], object]) -> int:
    """Stream ``image`` (any format ``open_source`` reads) and its bmap through ``write``;
    returns the data bytes sent."""
    bmap_bytes = bmap.read_bytes() if bmap is not None else b""
    sent = 0
    with open_source(image) as src:
        header = {"size": src.size, "bmap": len(bmap_bytes), "image": image.name}
        write(json.dumps(header).encode() + b"\n" + bmap_bytes)
        end = 0
        for pos, data in _data(src, bmap):
            write(FRAME.pack(pos, len(data)) + data)
            sent += len(data)
            end = max(end, pos + len(data))
        write(FRAME.pack(src.size if src.size is not None else src.position, 0))
    return sent


class StreamedImage(ImageSource):
    """The image read back from a stream ``send`` wrote: sequential, zeros between frames."""

    local = False

    def __init__(self, stream: BinaryIO, name: str, folder: Path) -> None:
        """Reads the header; the bmap (if any) is written to ``folder``: ``self.bmap``."""
        line = stream.readline(4096)
        try:
            header = json.loads(line)
            size, bmap_len = header["size"], int(header["bmap"])
            image = Path(str(header.get("image") or "image"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InfraError(f"the image stream for {name} starts with no header "
                             f"({line[:80]!r}): {exc}", part="flash") from None
        super().__init__(Path(f"{name}:{image.name}"))
        self.stream = stream
        self.size = None if size is None else int(size)
        self.min_size = self.size or 0
        self.bmap: Path | None = None
        if bmap_len:
            self.bmap = folder / f"{image.name}.bmap"
            self.bmap.write_bytes(self._exactly(bmap_len, "the bmap"))
        self.frame_at, self.frame_left = self._next_frame(0)

    def _exactly(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise InfraError(f"{self.path}: the stream ended inside {what} ({len(data)} of {n} "
                             f"bytes, at image offset {self.position}): the sender stopped",
                             part="flash")
        return data

    def _next_frame(self, after: int) -> tuple[int, int]:
        at, length = FRAME.unpack(self._exactly(FRAME.size, "a frame header"))
        if at < after:
            raise InfraError(f"{self.path}: a frame at offset {at} goes back before offset "
                             f"{after}: not an image stream", part="flash")
        return at, length

    def _read_some(self, out: memoryview) -> int:
        pos = self.position
        if pos < self.frame_at:  # a gap: zeros
            n = min(len(out), self.frame_at - pos)
            out[:n] = bytes(n)
            return n
        if self.frame_left == 0:  # the end frame: the image ends here
            return 0
        data = self.stream.read(min(len(out), self.frame_left))
        n = len(data)
        out[:n] = data
        if not n:
            raise InfraError(f"{self.path}: the stream ended at image offset {pos}, inside a "
                             "frame: the sender stopped", part="flash")
        self.frame_left -= n
        self.frame_at += n
        if self.frame_left == 0:
            self.frame_at, self.frame_left = self._next_frame(self.frame_at)
        return n
