"""Read back what was written and compare SHA-256 with the digests taken while writing.

The target is read past the page cache (see ``_Reader``), so we see what the medium holds, not
what we just gave the kernel. One thread reads, two hash (hashlib releases the GIL): runs go to
the less busy hasher. When reading starts is the caller's choice (``overlap``): each run as soon
as it is written, overlapping the rest of the write; or all of them once the last one is written,
alongside the final flush.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hil.errors import InfraError
from hil.flash.bmap import Bmap
from hil.flash.pipeline import CHUNK, END, SLOTS, Buffers, Failure, start_stage
from hil.flash.safety import Target, vanished
from hil.flash.source import open_source

HASHERS = 2
FILE_ALIGN = 4096  # O_DIRECT on a file: a page covers any filesystem block size up to it


class Run:
    """A contiguous written range and the SHA-256 it must read back with: of the bytes sent
    there, or the bmap's checksum of that range (``key``: its index in the bmap)."""

    __slots__ = ("digest", "end", "key", "start")

    def __init__(self, start: int, end: int, digest: bytes = b"", key: int | None = None
                 ) -> None:
        self.start, self.end, self.digest, self.key = start, end, digest, key


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER: the range is on disk, clean


class _Reader:
    """pread on the target, past the page cache. With O_DIRECT (block devices; files when
    ``direct`` and the filesystem supports it) the kernel writes back what the cache holds for
    the range, then reads the medium. Otherwise each range is written back (sync_file_range)
    and dropped from the cache (POSIX_FADV_DONTNEED) before an ordinary read, which then comes
    from the disk. Files being written get the latter: ext4 makes O_DIRECT reads wait for the
    inode lock that each buffered write takes."""

    def __init__(self, t: Target, direct: bool = True) -> None:
        self.t = t
        self.direct = direct or t.kind == "block"
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as exc:
                if t.kind == "block" or exc.errno != errno.EINVAL:  # EINVAL: not on this fs
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC)
        self.align = t.logical_block_size if t.kind == "block" else (
            FILE_ALIGN if self.direct else 1)

    def _settle(self, start: int, end: int) -> None:
        """Make [start, end) of a file come from the medium on the next buffered read."""
        if _libc.sync_file_range(self.fd, start, end - start, SYNC_RANGE_ALL) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def pread(self, view: memoryview, offset: int) -> int:
        if self.direct:
            try:
                return os.preadv(self.fd, [view], offset)
            except OSError as exc:  # a file system that opens O_DIRECT but refuses to read so
                if self.t.kind == "block" or exc.errno != errno.EINVAL:
                    raise
            os.close(self.fd)
            self.fd = os.open(self.t.path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
        self._settle(offset, offset + len(view))
        return os.preadv(self.fd, [view], offset)

    def close(self) -> None:
        os.close(self.fd)


class Verifier:
    """Feed it runs as they are written (``add``), call ``written`` once the last one is, and
    ``finish`` after the final flush. ``overlap``: read each run back as soon as it is added;
    otherwise from ``written`` on (with O_DIRECT on a file, so the final flush and the read-back
    proceed together: each read waits only for its own range to reach the medium)."""

    def __init__(self, t: Target, write_fd: int, image: Path,
                 progress: Callable[[int, int, float], None], bmap: Bmap | None = None, *,
                 overlap: bool = True) -> None:
        self.t, self.write_fd, self.image, self.progress = t, write_fd, image, progress
        self.bmap = bmap
        self.overlap = overlap
        self.reader = _Reader(t, direct=not overlap)
        self.bufs = Buffers(SLOTS)
        self.runs: list[Run] = []
        self.runs_q: queue.Queue[Any] = queue.Queue()
        self.hash_qs: list[queue.Queue[Any]] = [queue.Queue() for _ in range(HASHERS)]
        self.results: queue.Queue[Any] = queue.Queue()
        self.pending = [0] * HASHERS  # bytes dealt to each hasher, not yet hashed
        self.total = self.done = 0
        self.bad: dict[int, bytes] = {}  # run index -> digest read back
        self.t0 = time.monotonic()
        self.started = False
        self.threads: list[threading.Thread] = []
        if self.overlap:
            self._start()

    def _start(self) -> None:
        self.started = True
        self.t0 = time.monotonic()
        self.threads = [start_stage(self._read_stage, self.hash_qs, self.bufs,
                                    "flash-verify-read")]
        self.threads += [start_stage(functools.partial(self._hash_stage, h), [self.results],
                                     self.bufs, f"flash-verify-hash{h}")
                         for h in range(HASHERS)]

    def add(self, runs: list[Run]) -> None:
        for r in runs:
            self.total += r.end - r.start
            self.runs.append(r)
            if self.overlap:
                self.runs_q.put(len(self.runs) - 1)
        self.poll()

    def written(self) -> None:
        """Every run has been added and handed to the kernel: start reading all of them."""
        if not self.started:
            for i in range(len(self.runs)):
                self.runs_q.put(i)
            self._start()

    def _read_stage(self) -> None:
        align, bufs = self.reader.align, self.bufs
        while True:
            # no deadline: runs arrive at the pace of the write, which has its own
            i = bufs.get(self.runs_q, "the next written run to verify", timeout=None)
            if i is END:
                return
            r = self.runs[i]
            h = self.pending.index(min(self.pending))
            self.pending[h] += r.end - r.start
            pos = r.start - r.start % align
            while pos < r.end:
                n = min(CHUNK, -(-(r.end - pos) // align) * align)
                slot = bufs.acquire()
                try:
                    got = self.reader.pread(bufs.views[slot][:n], pos)
                except OSError as exc:
                    gone = vanished(self.t, self.write_fd)
                    raise InfraError(f"reading back {self.t} at offset {pos} failed: "
                                     f"{gone or exc.strerror}", part="flash") from exc
                if got < min(n, r.end - pos):
                    raise InfraError(f"{self.t}: read back only {got} of {n} bytes at offset "
                                     f"{pos}: it is smaller than what was written",
                                     part="flash")
                lo, hi = max(r.start, pos) - pos, min(r.end, pos + n) - pos
                bufs.put(self.hash_qs[h], (slot, i, lo, hi, pos + n >= r.end))
                pos += n

    def _hash_stage(self, h: int) -> None:
        sha = hashlib.sha256()
        while True:
            item = self.bufs.get(self.hash_qs[h], "data read back from the target")
            if item is END:
                return
            if isinstance(item, Failure):
                raise item.exc
            slot, i, lo, hi, last = item
            sha.update(self.bufs.views[slot][lo:hi])
            self.bufs.release(slot)
            self.pending[h] -= hi - lo
            if last:
                r = self.runs[i]
                self.bufs.put(self.results, (i, sha.digest(), r.end - r.start))
                sha = hashlib.sha256()

    def _take(self, item: Any) -> bool:
        """Account one result; True when a hasher has finished."""
        if item is END:
            return True
        if isinstance(item, Failure):
            raise item.exc
        i, digest, size = item
        self.done += size
        if digest != self.runs[i].digest:
            self.bad[i] = digest
        self.progress(self.done, self.total, time.monotonic() - self.t0)
        return False

    def poll(self) -> None:
        """Take the results so far without waiting; a mismatch stops the write right away."""
        while True:
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                break
            self._take(item)  # hashers end only after finish() sends END
        if self.bad:
            self._fail()

    def finish(self) -> None:
        """Call after the final flush: verify what is left, raise on any difference."""
        try:
            self.written()
            self.runs_q.put(END)
            ended = 0
            while ended < HASHERS:
                ended += self._take(self.bufs.get(self.results, "hashes of data read back"))
        finally:
            self.close()
        if self.bad:
            self._fail()

    def _fail(self) -> None:
        """Name the first bad byte; or, if the target holds exactly the image and only the
        bmap's checksum disagrees, say that the image does not match its bmap."""
        self.close()
        i = min(self.bad)
        r = self.runs[i]
        offset = first_difference(self.image, self.t, r.start, r.end)
        if offset is None and self.bmap is not None and r.key is not None:
            rng = self.bmap.ranges[r.key]
            raise InfraError(f"{self.bmap.describe(rng)}: the image data there has "
                             f"{self.bmap.checksum_type} {self.bad[i].hex()}, the bmap says "
                             f"{rng.checksum}: the image is corrupt or the bmap belongs to "
                             f"another image ({self.image})", part="flash")
        where = f"at offset {offset} (first bad byte" if offset is not None else (
            f"in {r.start}-{r.end - 1} (the bytes now compare equal: it changed while we read"
        )
        raise InfraError(f"verify failed: {self.t} differs from {self.image} {where}; "
                         f"{len(self.bad)} of {len(self.runs)} written runs differ so far, the "
                         f"first at {r.start}-{r.end - 1}): the medium is failing or something "
                         "else wrote to it", part="flash")

    def close(self) -> None:
        self.bufs.stop()
        for th in self.threads:
            th.join(timeout=5)
        self.bufs.close()
        if self.reader.fd >= 0:
            self.reader.close()
            self.reader.fd = -1


def first_difference(image: Path, t: Target, start: int, end: int) -> int | None:
    """First offset in [start, end) where target and image differ. The slow path: runs only
    after the hashes disagreed, to name the byte."""
    step = 1 << 20
    reader = _Reader(t)
    maps = mmap.mmap(-1, step), mmap.mmap(-1, step)
    want, have = memoryview(maps[0]), memoryview(maps[1])
    try:
        with open_source(image) as src:
            pos = start - start % step  # aligned, so O_DIRECT reads are too
            skip = pos
            while skip > 0 and not src.seekable:
                skip -= src.readinto(want[: min(step, skip)]) or skip
            while pos < end:
                n = min(step, end - pos)
                got = src.pread(want[:n], pos) if src.seekable else src.readinto(want[:n])
                reader.pread(have, pos)
                a, b = bytes(want[:got]), bytes(have[:got])
                if a != b:
                    for i in range(max(0, start - pos), got):
                        if a[i] != b[i]:
                            return pos + i
                pos += n
    finally:
        reader.close()
        want.release()
        have.release()
        for m in maps:
            m.close()
    return None
