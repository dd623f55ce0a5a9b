"""Writing to the target: a disk file or a block device.

Bulk writes use O_DIRECT: no dirty page cache builds up, so neither Ctrl-C nor close() ever
waits for gigabytes of writeback, and the O_DIRECT read-back need not flush first (a second,
buffered descriptor takes unaligned tails). A background thread calls fdatasync every few dozen
MiB so the device (or a loop device's backing file) commits while we read, decompress and hash;
the final flush is short. Areas the image leaves empty are made zero per ``prepare``: a fresh
sparse file, hole punching (guaranteed zeros, no fallback), BLKDISCARD, BLKZEROOUT
(``zero_fill``), or nothing (bmap).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading
import time

from hil.errors import DeadlineError, InfraError
from hil.flash.safety import Target

log = logging.getLogger(__name__)

BLKDISCARD, BLKZEROOUT = 0x1277, 0x127F
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
FLUSH_EVERY = 32 << 20  # start writeback after this many new bytes
MAX_UNFLUSHED = 128 << 20  # buffered block devices: bound what close() would have to flush
FLUSH_TIMEOUT = 600.0
DIRECT = {"block": True, "file": False}  # files: buffered was faster (measured)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class TargetIO:
    """``fd`` (buffered; exclusive for block devices) takes unaligned writes, truncation,
    ioctls and flushes; ``dfd`` (O_DIRECT, -1 if unavailable) takes the aligned bulk."""

    def __init__(self, t: Target) -> None:
        self.t = t
        # files: 4 KiB keeps O_DIRECT aligned on any filesystem block size up to a page
        self.lbs = t.logical_block_size if t.kind == "block" else 4096
        self.gap_mode = "none"
        self.zeroing = ""
        self.written = 0
        self._flushed_mark = 0  # self.written when the last completed flush began
        self._flush_error: OSError | None = None
        self._wake = threading.Event()
        self._stop = False
        self._flusher: threading.Thread | None = None
        self.dfd = -1
        self.prepared = False  # nothing on the target has changed before ``prepare``
        self.created = False  # the file did not exist: a failed flash removes it
        if t.kind == "file":
            try:
                self.fd = os.open(t.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                  0o644)
                self.created = True
            except FileExistsError:
                self.fd = os.open(t.path, os.O_RDWR | os.O_CLOEXEC)
            self.old_size = os.fstat(self.fd).st_size
        else:
            try:  # O_EXCL: the kernel refuses if it is mounted or claimed (EBUSY)
                self.fd = os.open(t.path, os.O_WRONLY | os.O_CLOEXEC | os.O_EXCL)
            except OSError as exc:
                why = "it is in use (mounted, or opened exclusively by another program)" if (
                    exc.errno == errno.EBUSY) else exc.strerror
                raise InfraError(f"refusing to write {t}: {why}; nothing was written",
                                 part="flash") from exc
            self.old_size = t.size
        if DIRECT[t.kind]:
            with contextlib.suppress(OSError):  # e.g. EINVAL: no O_DIRECT on this filesystem
                self.dfd = os.open(t.path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)

    @property
    def direct(self) -> bool:
        return self.dfd >= 0

    def prepare(self, size: int, *, zero_fill: bool, have_bmap: bool) -> None:
        """Decide how unwritten areas become zero; truncate a file target (fresh and sparse)."""
        self.prepared = True
        if self.t.kind == "file":
            os.ftruncate(self.fd, 0)  # drops old content and its blocks
            os.ftruncate(self.fd, max(size, self.old_size))  # a virtual disk keeps its size
            self.zeroing = "holes in a fresh file"
        elif zero_fill:
            self.gap_mode, self.zeroing = "zeroout", "zero-filled (BLKZEROOUT)"
        elif have_bmap:
            self.zeroing = "left as they were (the bmap says they are unused)"
        else:
            self.gap_mode, self.zeroing = "punch", "zeroed by hole punching (write-zeroes)"
        self._flusher = threading.Thread(target=self._flush_loop, name="flash-flush",
                                         daemon=True)
        self._flusher.start()

    def write(self, view: memoryview, offset: int) -> None:
        if self.t.kind == "block" and offset + len(view) > self.t.size:
            raise InfraError(f"the image is larger than {self.t}: it continues past byte "
                             f"{self.t.size}", part="flash")
        aligned = self.dfd >= 0 and not (offset % self.lbs or len(view) % self.lbs)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.dfd if aligned else self.fd, view[done:], offset + done)
            except OSError as exc:  # O_DIRECT opened but refused: write through the cache
                if not aligned or exc.errno != errno.EINVAL:
                    raise
                os.close(self.dfd)
                self.dfd, aligned = -1, False
        self.written += done
        if self.written - self._flushed_mark >= FLUSH_EVERY:
            self._wake.set()
            if not self.direct and self.t.kind == "block":
                self._wait_flushed(MAX_UNFLUSHED)

    def copy_range(self, src_fd: int, offset: int, length: int) -> int:
        """copy_file_range from the same offset of ``src_fd``: no copy through user space."""
        n = os.copy_file_range(src_fd, self.fd, length, offset, offset)
        self.written += n
        if self.written - self._flushed_mark >= FLUSH_EVERY:
            self._wake.set()
        return n

    def gap(self, start: int, end: int) -> None:
        """[start, end) is zero in the image and will not be written: make it zero."""
        if self.gap_mode == "none" or end <= start:
            return
        a = -(-start // self.lbs) * self.lbs  # the aligned part goes to the device ...
        b = end // self.lbs * self.lbs
        if a >= b:
            self.write(memoryview(bytes(end - start)), start)
            return
        for lo, hi in ((start, a), (b, end)):  # ... unaligned slivers are written as zeros
            if lo < hi:
                self.write(memoryview(bytes(hi - lo)), lo)
        if self.gap_mode == "punch":
            try:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, a, b - a)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            if self.t.discard:
                self.gap_mode = "discard"
                self.zeroing = "discarded (BLKDISCARD; most media then read zeros)"
            else:
                self.gap_mode = "none"
                self.zeroing = "left as they were (no write-zeroes or discard support)"
                log.warning("%s supports neither write-zeroes nor discard: areas the image "
                            "leaves empty keep their old content (zero_fill / --zero-fill "
                            "writes them)", self.t)
                return
        request = BLKZEROOUT if self.gap_mode == "zeroout" else BLKDISCARD
        fcntl.ioctl(self.fd, request, struct.pack("QQ", a, b - a))

    def _flush_loop(self) -> None:
        while not self._stop:
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            mark = self.written
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                self._flush_error = exc
                return
            self._flushed_mark = mark

    def _wait_flushed(self, limit: int) -> None:
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self.written - self._flushed_mark > limit and self._flush_error is None:
            if time.monotonic() > deadline:
                raise DeadlineError(f"{self.t} to accept data (fdatasync)",
                                    f"{self.written - self._flushed_mark} bytes unflushed",
                                    FLUSH_TIMEOUT)
            time.sleep(0.01)

    def _stop_flusher(self) -> None:
        self._stop = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=FLUSH_TIMEOUT)

    def finish(self, size: int) -> None:
        """Final size (files) and flush; raises OSError as the flusher saw it."""
        self._stop_flusher()
        if self._flush_error is not None:
            raise self._flush_error
        if self.t.kind == "file" and os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        os.fsync(self.fd)  # also flushes the device's write cache

    def close(self) -> None:
        """Idempotent: a failed flash closes before it removes a file it created."""
        self._stop_flusher()  # it must not flush a descriptor closed under it
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
