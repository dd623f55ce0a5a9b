"""Open a release artifact as a stream of decompressed bytes.

Formats are told apart by their magic bytes (the suffix only guards against a file that claims to
be compressed but is not). Nothing is decompressed to disk: callers pull fixed-size chunks with
``readinto``. Every decoding failure becomes an ``InfraError`` naming the file and the offsets.
"""

from __future__ import annotations

import bz2
import ctypes
import errno
import io
import logging
import lzma
import os
import struct
import zlib
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, cast

from hil.errors import InfraError

log = logging.getLogger(__name__)

IN_CHUNK = 1 << 20  # compressed bytes read per call: small enough to name a precise offset

MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)
SUFFIXES = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd", ".zip": "zip",
            ".bz2": "bzip2"}


def detect_format(head: bytes) -> str:
    """Format name from the first bytes of a file: gzip, xz, zstd, zip, bzip2 or raw."""
    for magic, name in MAGICS:
        if head.startswith(magic):
            return name
    # zstd skippable frame (magic 0x184D2A5?) may precede the real frame
    if len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
        return "zstd"
    if len(head) >= 10 and head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == (
            b"1AY&SY"):
        return "bzip2"
    return "raw"


def _error(path: Path, fmt: str, what: str, out_pos: int | None, in_pos: int | None
           ) -> InfraError:
    if out_pos is None:
        where = f"at compressed offset {in_pos}"
    else:
        where = f"at decompressed offset {out_pos}"
        if in_pos is not None:
            where += f" (near compressed offset {in_pos})"
    return InfraError(f"{path}: {fmt} image is {what} {where}", part="flash")


class ImageSource:
    """Sequential reader of an image's decompressed bytes.

    ``size`` is the exact decompressed size when the container records it (raw, zip, xz index,
    zstd frame headers), else None; ``min_size`` is a lower bound (gzip's ISIZE) used to refuse a
    too-small target before anything is written.
    """

    format = "raw"
    seekable = False
    local = True  # ``path`` is a file here (a streamed image only names where it comes from)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size: int | None = None
        self.min_size = 0
        self.position = 0  # decompressed bytes delivered so far

    def _read_some(self, out: memoryview) -> int:
        raise NotImplementedError

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` completely unless the image ends first; returns the byte count."""
        done = 0
        while done < len(buf):
            n = self._read_some(buf[done:])
            if n == 0:
                break
            done += n
            self.position += n  # kept current so errors name the exact offset reached
        if self.size is not None and (self.position > self.size or (
                done < len(buf) and self.position < self.size)):
            raise _error(self.path, self.format, f"not its recorded size of {self.size} bytes: "
                         "the data ends", self.position, None)
        return done

    def data_extents(self) -> list[tuple[int, int]] | None:
        """(start, end) byte ranges that may hold data, for seekable sources; None otherwise."""
        return None

    def pread(self, buf: memoryview, offset: int) -> int:
        raise TypeError(f"{self.format} source is not seekable")

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RawSource(ImageSource):
    """An uncompressed image: random access, and sparse files tell us where their holes are."""

    seekable = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = self.min_size = os.fstat(self.fd).st_size
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _read_some(self, out: memoryview) -> int:
        return os.preadv(self.fd, [out], self.position)

    def readinto(self, buf: memoryview) -> int:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], self.position + done)
            if n == 0:
                break
            done += n
        self.position += done
        return done

    def pread(self, buf: memoryview, offset: int) -> int:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def data_extents(self) -> list[tuple[int, int]] | None:
        assert self.size is not None
        extents: list[tuple[int, int]] = []
        pos = 0
        try:
            while pos < self.size:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
                end = os.lseek(self.fd, start, os.SEEK_HOLE)
                extents.append((start, min(end, self.size)))
                pos = end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return extents
            return [(0, self.size)]  # filesystem without SEEK_DATA: treat all as data
        return extents

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Codec(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int) -> bytes: ...


class _ZlibCodec:
    """zlib's decompressobj keeps unconsumed input itself; give it lzma's interface."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)  # gzip container only

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._d.decompress(self._d.unconsumed_tail + data, max_length)


class _StreamSource(ImageSource):
    """gzip, xz and bzip2: a decompressor object fed 1 MiB at a time, concatenated members ok."""

    magic = b""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._file_size = os.fstat(self._f.fileno()).st_size
        self._codec = self._new_codec()
        self._pending = b""  # input read from the file but not yet given to the codec
        self._in_pos = 0  # compressed bytes read from the file
        self._in_eof = False

    def _new_codec(self) -> _Codec:
        raise NotImplementedError

    def _exceptions(self) -> tuple[type[BaseException], ...]:
        return (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError)

    def _read_in(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = self._f.read(IN_CHUNK)
        self._in_pos += len(data)
        if not data:
            self._in_eof = True
        return data

    def _next_member(self) -> bool:
        """After a member ends: start the next one, skip zero padding, or stop at the end."""
        rest = self._codec.unused_data + self._pending
        self._pending = b""
        while True:
            rest = rest.lstrip(b"\0")
            if len(rest) >= len(self.magic) or self._in_eof:
                break
            more = self._read_in()
            rest += more
        if not rest:
            return False
        if rest.startswith(self.magic):
            self._codec = self._new_codec()
            self._pending = rest
            return True
        log.warning("%s: ignoring %d+ bytes of trailing data after the %s stream", self.path,
                    len(rest), self.format)
        return False

    def _read_some(self, out: memoryview) -> int:
        while True:
            if self._codec.eof:
                if not self._next_member():
                    return 0
                continue
            data = self._read_in() if self._codec.needs_input and not self._in_eof else b""
            try:
                got = self._codec.decompress(data, len(out))
            except self._exceptions() as exc:
                raise _error(self.path, self.format, f"corrupt ({exc})",
                             self.position, self._in_pos - len(self._pending)) from exc
            if got:
                out[: len(got)] = got
                return len(got)
            if self._in_eof and not self._codec.eof:
                raise _error(self.path, self.format,
                             "truncated: the compressed stream ends without its end marker",
                             self.position, self._file_size)

    def close(self) -> None:
        self._f.close()


class GzipSource(_StreamSource):
    format = "gzip"
    magic = b"\x1f\x8b"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        if self._file_size >= 18:  # ISIZE: decompressed size mod 2**32 of the last member
            self._f.seek(-4, os.SEEK_END)
            self.min_size = struct.unpack("<I", self._f.read(4))[0]
            self._f.seek(0)

    def _new_codec(self) -> _Codec:
        return _ZlibCodec()


class Bzip2Source(_StreamSource):
    format = "bzip2"
    magic = b"BZh"

    def _new_codec(self) -> _Codec:
        return bz2.BZ2Decompressor()


class XzSource(_StreamSource):
    format = "xz"
    magic = b"\xfd7zXZ\x00"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.size = self.min_size = xz_uncompressed_size(self._f, self._file_size, path)
        self._f.seek(0)

    def _new_codec(self) -> _Codec:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)


def _xz_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def xz_uncompressed_size(f: BinaryIO, file_size: int, path: Path) -> int:
    """Sum the uncompressed sizes in each stream's index, walking backwards from the end.

    A missing footer means the file was cut short: refuse now, before anything is written.
    """
    total, end = 0, file_size
    while end > 0:
        while end > 0:  # stream padding: zero bytes between and after streams
            start = max(0, end - 4096)
            f.seek(start)
            tail = f.read(end - start)
            kept = len(tail.rstrip(b"\0"))
            end = start + kept
            if kept:
                break
        if end == 0:
            break
        f.seek(max(0, end - 12))  # a file shorter than a footer is refused just below
        footer = f.read(min(end, 12))
        if end < 32 or footer[10:12] != b"YZ":
            raise _error(path, "xz", "truncated: no xz stream footer ('YZ') at the end of the "
                         f"file (saw {footer[-2:]!r})", None, end)
        index_size = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
        index_start = end - 12 - index_size
        if index_start < 12:
            raise _error(path, "xz", "corrupt: stream footer names an impossible index size",
                         None, end - 12)
        f.seek(index_start)
        index = f.read(index_size)
        try:
            if index[0] != 0:
                raise ValueError("no index indicator")
            records, pos = _xz_varint(index, 1)
            blocks = 0
            for _ in range(records):
                unpadded, pos = _xz_varint(index, pos)
                size, pos = _xz_varint(index, pos)
                blocks += (unpadded + 3) & ~3
                total += size
        except (ValueError, IndexError) as exc:
            raise _error(path, "xz", f"corrupt: unreadable stream index ({exc})", None,
                         index_start) from exc
        end = index_start - blocks - 12
        if end < 0:
            raise _error(path, "xz", "corrupt: stream index points before the file start", None,
                         index_start)
    return total


class _CountingReader(io.RawIOBase):
    """Counts the compressed bytes zstandard pulls, to name an offset in errors."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        return data


class _ZstdIn(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _ZstdOut(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


def _load_libzstd() -> ctypes.CDLL | None:
    """libzstd through ctypes, which releases the GIL during each call: the zstandard module
    holds it while decompressing, which would stall the hashing and writing threads."""
    try:
        try:
            lib = ctypes.CDLL("libzstd.so.1")
        except OSError:  # find_library runs ldconfig: only when the usual name is not there
            from ctypes.util import find_library

            lib = ctypes.CDLL(find_library("zstd") or "libzstd.so")
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ZstdOut),
                                              ctypes.POINTER(_ZstdIn)]
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
    except (OSError, AttributeError):
        return None
    return lib


_LIBZSTD: list[ctypes.CDLL | None] = []  # loaded on first use


def libzstd() -> ctypes.CDLL | None:
    if not _LIBZSTD:
        _LIBZSTD.append(_load_libzstd())
    return _LIBZSTD[0]
ZSTD_D_WINDOWLOGMAX = 100  # allow images compressed with --long (windows up to 2 GiB)


class ZstdSource(ImageSource):
    """zstd. Frames are walked first (headers only): that catches a cut-off file before anything
    is written and gives the exact size when the frames record it."""

    format = "zstd"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed in close())
        sizes = zstd_frame_sizes(self._f.fileno(), os.fstat(self._f.fileno()).st_size, path)
        if sizes and all(s is not None for s in sizes):
            self.size = self.min_size = sum(s for s in sizes if s is not None)
        self._lib = libzstd()
        self._in_pos = 0  # compressed bytes read
        if self._lib is not None:
            self._dctx = self._lib.ZSTD_createDCtx()
            self._lib.ZSTD_DCtx_setParameter(self._dctx, ZSTD_D_WINDOWLOGMAX, 31)
            self._inbuf = bytearray(IN_CHUNK)
            self._in = _ZstdIn(ctypes.addressof(ctypes.c_char.from_buffer(self._inbuf)), 0, 0)
            self._in_eof = False
            self._ret = 0  # last ZSTD_decompressStream result: 0 = at a frame boundary
        else:
            import zstandard

            self._zstd_error = zstandard.ZstdError
            self._counter = _CountingReader(self._f)
            self._reader = zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, self._counter), read_size=IN_CHUNK, read_across_frames=True,
                closefd=False)

    def _read_some(self, out: memoryview) -> int:
        if self._lib is None:
            try:
                return int(self._reader.readinto(out))
            except self._zstd_error as exc:
                raise _error(self.path, self.format, f"corrupt ({exc})", self.position,
                             self._counter.count) from exc
        lib, zin = self._lib, self._in
        target = ctypes.c_char.from_buffer(out)
        zout = _ZstdOut(ctypes.addressof(target), len(out), 0)
        try:
            while True:
                if zin.pos == zin.size and not self._in_eof:
                    n = os.readv(self._f.fileno(), [self._inbuf])
                    self._in_pos += n
                    zin.size, zin.pos, self._in_eof = n, 0, n == 0
                if self._in_eof and self._ret == 0:  # all input used, last frame complete
                    return 0
                ret = lib.ZSTD_decompressStream(self._dctx, ctypes.byref(zout),
                                                ctypes.byref(zin))
                if lib.ZSTD_isError(ret):
                    name = lib.ZSTD_getErrorName(ret).decode(errors="replace")
                    raise _error(self.path, self.format, f"corrupt ({name})",
                                 self.position + zout.pos,
                                 self._in_pos - (zin.size - zin.pos))
                self._ret = ret
                if zout.pos:
                    return int(zout.pos)
                if self._in_eof:
                    if ret != 0:
                        raise _error(self.path, self.format, "truncated: the file ends inside "
                                     "a frame", self.position, self._in_pos)
                    return 0
        finally:
            del target  # release the export of ``out`` so its buffer can be freed

    def close(self) -> None:
        if self._lib is not None:
            if self._dctx:
                self._lib.ZSTD_freeDCtx(self._dctx)
                self._dctx = None
        else:
            self._reader.close()  # type: ignore[no-untyped-call]
        self._f.close()


def zstd_frame_sizes(fd: int, file_size: int, path: Path) -> list[int | None]:
    """Walk zstd frame and block headers; returns each frame's content size (None if unknown).

    Raises InfraError if the file ends inside a frame (truncated) or a header is invalid.
    """
    sizes: list[int | None] = []
    pos = 0

    def need(n: int, what: str) -> bytes:
        data = os.pread(fd, n, pos)
        if len(data) < n:
            raise _error(path, "zstd", f"truncated: the file ends inside {what}", None, file_size)
        return data

    while pos < file_size:
        magic = struct.unpack("<I", need(4, "a frame magic"))[0]
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
            length = struct.unpack("<I", need(8, "a skippable frame header")[4:])[0]
            pos += 8 + length
            if pos > file_size:
                raise _error(path, "zstd", "truncated: the file ends inside a skippable frame",
                             None, file_size)
            continue
        if magic != 0xFD2FB528:
            raise _error(path, "zstd", f"corrupt: bad frame magic {magic:#010x}", None, pos)
        desc = need(5, "a frame header")[4]
        fcs_flag, single, checksum, dict_flag = desc >> 6, desc >> 5 & 1, desc >> 2 & 1, desc & 3
        fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
        header_len = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + fcs_len
        header = need(4 + header_len, "a frame header")
        content: int | None = None
        if fcs_len:
            content = int.from_bytes(header[4 + header_len - fcs_len:], "little")
            if fcs_len == 2:
                content += 256
        pos += 4 + header_len
        while True:  # blocks: 3-byte header, bit 0 = last block
            bh = int.from_bytes(need(3, "a block header"), "little")
            last, btype, bsize = bh & 1, bh >> 1 & 3, bh >> 3
            if btype == 3:
                raise _error(path, "zstd", "corrupt: reserved block type", None, pos)
            pos += 3 + (1 if btype == 1 else bsize)
            if pos > file_size:
                raise _error(path, "zstd", "truncated: the file ends inside a block", None,
                             file_size)
            if last:
                break
        pos += 4 if checksum else 0
        if pos > file_size:
            raise _error(path, "zstd", "truncated: the file ends inside a frame checksum", 0,
                         file_size)
        sizes.append(content)
    return sizes


class ZipSource(ImageSource):
    """The first (or only) ``.img`` member of a zip archive, streamed."""

    format = "zip"

    def __init__(self, path: Path) -> None:
        import zipfile  # (only here: it is slow to import)

        super().__init__(path)
        # a damaged archive surfaces as any of these, from deep inside zipfile (a negative
        # seek, a bad struct, an unknown method, an encrypted member): each names the file here
        self._errors = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError,
                        ValueError, NotImplementedError, RuntimeError, struct.error)
        self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed in close())
        try:
            self._zip = zipfile.ZipFile(self._f)
        except self._errors as exc:
            self._f.close()
            raise InfraError(f"{path}: not a readable zip archive ({exc}); a zip whose end "
                             "(central directory) is missing was cut short", part="flash"
                             ) from exc
        files = [i for i in self._zip.infolist() if not i.is_dir()]
        images = [i for i in files if i.filename.lower().endswith(".img")]
        if not images and len(files) != 1:
            names = ", ".join(i.filename for i in files[:10]) or "nothing"
            self.close()
            raise InfraError(f"{path}: expected one .img member in the zip, found: {names}",
                             part="flash")
        self.member = (images or files)[0]
        self.size = self.min_size = self.member.file_size
        try:
            self._member_f = self._zip.open(self.member)
        except self._errors as exc:
            self.close()
            raise InfraError(f"{path}: cannot read member {self.member.filename}: {exc}",
                             part="flash") from exc

    def _read_some(self, out: memoryview) -> int:
        try:
            data = self._member_f.read(len(out))
        except self._errors as exc:
            raise _error(self.path, f"zip ({self.member.filename})", f"corrupt ({exc})",
                         self.position, self._f.tell()) from exc
        out[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._zip.close()
        self._f.close()


_CLASSES: dict[str, type[ImageSource]] = {
    "raw": RawSource, "gzip": GzipSource, "xz": XzSource, "zstd": ZstdSource,
    "zip": ZipSource, "bzip2": Bzip2Source,
}


def open_source(path: str | os.PathLike[str]) -> ImageSource:
    """Open an image artifact for streaming; use as a context manager."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise InfraError(f"cannot open image {path}: {exc.strerror}", part="flash") from exc
    fmt = detect_format(head)
    claimed = SUFFIXES.get(path.suffix.lower())
    if claimed and fmt != claimed:
        raise InfraError(f"{path}: the name says {claimed} but the content is {fmt} (first "
                         f"bytes {head[:6].hex()}); the file is damaged or misnamed",
                         part="flash")
    if fmt != "raw":
        log.debug("%s: %s compressed", path, fmt)
    return _CLASSES[fmt](path)
