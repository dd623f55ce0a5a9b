"""``flash()``: write an image to a disk or disk file, only its data, then prove it arrived.

Three stages overlap (see ``pipeline``): read/decompress and find the data (bmap ranges, the
source's SEEK_DATA extents, or non-zero 4 KiB blocks) -> SHA-256 per written run (which is also
the bmap range check) -> write on the calling thread, so Ctrl-C lands there. ``verify`` reads the
runs back past the page cache and compares digests: while the write goes on, or (a raw image
copied inside the kernel, which keeps the disk busy by itself) from the moment the last range is
handed over, alongside the final flush.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

from hil.errors import ConfigError, InfraError
from hil.flash.bmap import Bmap, parse_bmap
from hil.flash.pipeline import (
    BLOCK,
    CHUNK,
    END,
    SLOTS,
    Buffers,
    Failure,
    nonzero_runs,
    start_stage,
)
from hil.flash.progress import FlashProgress, Phase, ProgressCallback, make_display
from hil.flash.safety import Presence, Target, check_target, vanished
from hil.flash.source import ImageSource, RawSource, open_source
from hil.flash.targetio import TargetIO
from hil.flash.verify import Run, Verifier

log = logging.getLogger(__name__)

MERGE_GAP = 1 << 20  # raw sources: read across holes smaller than this rather than seek
PREFETCH = 32 << 20  # raw images: ask for this much ahead of the copy (POSIX_FADV_WILLNEED)
RUN_SPLIT = 16 << 20  # verify runs are cut here (when no bmap checksum needs the whole range)


class FlashReport(NamedTuple):
    image: str
    target: str
    image_size: int
    bytes_written: int
    ranges: int  # contiguous runs written
    seconds: float
    write_seconds: float  # including the final flush
    verify_seconds: float
    verified: bool | None  # None: verification was switched off
    zeroing: str  # what happened to the areas the image leaves empty

    @property
    def mb_per_s(self) -> float:
        """Bytes written per second over the whole operation (write + flush + verify)."""
        return self.bytes_written / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        check = "verified" if self.verified else "not verified"
        return (f"{self.image} -> {self.target}: {self.bytes_written / 2**20:.1f} MiB in "
                f"{self.ranges} ranges of a {self.image_size / 2**20:.1f} MiB image in "
                f"{self.seconds:.2f} s (write {self.write_seconds:.2f} s, verify "
                f"{self.verify_seconds:.2f} s), {self.mb_per_s:.0f} MB/s, {check}; "
                f"empty areas: {self.zeroing}")


class _Hash(Protocol):
    def update(self, data: memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...
    def digest(self) -> bytes: ...


class _Chunk:
    __slots__ = ("length", "offset", "runs", "scan", "segs", "slot")

    def __init__(self, slot: int, offset: int, length: int,
                 segs: list[tuple[int, int, int | None]], scan: list[tuple[int, int]]) -> None:
        self.slot, self.offset, self.length = slot, offset, length
        self.segs = segs  # (start, end, bmap range index) to write
        self.scan = scan  # find the data here (stage 2)
        self.runs: list[Run] = []  # runs complete once this chunk is written


def _spans(extents: list[tuple[int, int, int | None]]) -> Iterator[
        tuple[int, int, list[tuple[int, int, int | None]]]]:
    """Group extents into reads of at most CHUNK bytes, reading across small holes."""
    cur: list[tuple[int, int, int | None]] = []
    for start, end, key in extents:
        pos = start
        while pos < end:
            if cur and (pos - cur[-1][1] > MERGE_GAP or pos + BLOCK > cur[0][0] + CHUNK):
                yield cur[0][0], cur[-1][1], cur
                cur = []
            piece_end = min(end, (cur[0][0] if cur else pos) + CHUNK)
            cur.append((pos, piece_end, key))
            pos = piece_end
    if cur:
        yield cur[0][0], cur[-1][1], cur


class _Job:
    def __init__(self, src: ImageSource, bm: Bmap | None, t: Target, tio: TargetIO,
                 callbacks: list[ProgressCallback], verify: bool, expected: int,
                 zero_fill: bool) -> None:
        self.src, self.bm, self.t, self.tio, self.callbacks = src, bm, t, tio, callbacks
        self.verify = verify
        self.expected, self.zero_fill = expected, zero_fill
        self.bufs = Buffers(SLOTS)
        self.last_runs: list[Run] = []  # closed at the end of the image
        self.verifier: Verifier | None = None
        self.presence = Presence(t, tio.fd)
        self.size = bm.image_size if bm else (src.size or src.min_size)
        self.written = 0
        self.ranges = 0

    def begin(self) -> None:
        """Make the target ready (a file target is truncated: its old content goes) once the
        first data has been decoded: an image refused at its start leaves the target as it
        was."""
        if self.tio.prepared:
            return
        self.tio.prepare(self.expected, zero_fill=self.zero_fill, have_bmap=self.bm is not None)
        log.info("flashing %s (%s) to %s; empty areas: %s", self.src.path, self.src.format,
                 self.t, self.tio.zeroing)

    # -- stage 1: find the data ------------------------------------------------------------
    def chunks(self) -> Iterator[_Chunk]:
        bm, src = self.bm, self.src
        if src.seekable:
            extents: list[tuple[int, int, int | None]]
            if bm:
                extents = [(*bm.byte_range(r), i) for i, r in enumerate(bm.ranges)]
            else:  # whole blocks, so zero detection and O_DIRECT stay aligned
                extents = [(s - s % BLOCK, min(-(-e // BLOCK) * BLOCK, self.size), None)
                           for s, e in src.data_extents() or []]
            for start, end, pieces in _spans(extents):
                slot = self.bufs.acquire()
                view = self.bufs.views[slot]
                if src.pread(view[: end - start], start) < end - start:
                    raise InfraError(f"{src.path}: short read before offset {end} (the image "
                                     "changed while being flashed?)", part="flash")
                yield _Chunk(slot, start, end - start,
                             [(s, e, k) for s, e, k in pieces if k is not None],
                             [(s, e) for s, e, k in pieces if k is None])
            return
        ranges = [bm.byte_range(r) for r in bm.ranges] if bm else []
        ri = offset = 0
        while True:
            slot = self.bufs.acquire()
            n = src.readinto(self.bufs.views[slot])
            if n == 0:  # the image size is a multiple of CHUNK
                self.bufs.release(slot)
                break
            end = offset + n
            if self.t.kind == "block" and end > self.t.size:  # before any of it is written
                raise InfraError(f"{src.path} decompresses to more than {self.t} holds: it "
                                 f"goes on past byte {self.t.size}", part="flash")
            segs: list[tuple[int, int, int | None]] = []
            if bm:
                while ri < len(ranges) and ranges[ri][1] <= offset:
                    ri += 1
                j = ri
                while j < len(ranges) and ranges[j][0] < end:
                    segs.append((max(offset, ranges[j][0]), min(end, ranges[j][1]), j))
                    j += 1
            yield _Chunk(slot, offset, n, segs, [] if bm else [(offset, end)])
            offset = end
            if n < CHUNK:
                break
        if bm and offset != bm.image_size:
            raise InfraError(f"{src.path} decompresses to {offset} bytes but {bm.source} "
                             f"describes a {bm.image_size}-byte image", part="flash")
        self.size = offset

    # -- stage 2: hash ---------------------------------------------------------------------
    def check_range(self, key: int, start: int, end: int, digest: _Hash) -> None:
        bm = self.bm
        assert bm is not None
        r = bm.ranges[key]
        if (start, end) != bm.byte_range(r):
            raise InfraError(f"{self.src.path} ends inside {bm.describe(r)}", part="flash")
        actual = digest.hexdigest()
        if r.checksum is not None and actual != r.checksum:
            raise InfraError(f"{bm.describe(r)}: the image data there has {bm.checksum_type} "
                             f"{actual}, the bmap says {r.checksum}: the image is corrupt or "
                             f"the bmap belongs to another image ({self.src.path})",
                             part="flash")

    def trusted_runs(self, inq: queue.Queue[Any], outq: queue.Queue[Any]) -> None:
        """Verifying against a bmap whose every range has a SHA-256: those checksums are what
        each range must read back as, so nothing is hashed while writing. One hashing pass (of
        the data read back) proves both that the image matches its bmap and that the medium
        holds it; ``Verifier`` tells the two failures apart."""
        bm = self.bm
        assert bm is not None
        while True:
            item = self.bufs.get(inq, "data from the image reader")
            if item is END:
                return
            if isinstance(item, Failure):
                raise item.exc
            for _s, e, key in item.segs:
                start, end = bm.byte_range(bm.ranges[key])
                if e == end:
                    item.runs.append(Run(start, end, bytes.fromhex(bm.ranges[key].checksum or ""),
                                         key))
            self.bufs.put(outq, item)

    def hash_stage(self, inq: queue.Queue[Any], outq: queue.Queue[Any]) -> None:
        bm = self.bm
        cs_type = bm.checksum_type if bm and any(r.checksum for r in bm.ranges) else None
        # SHA-256 bmap checksums: a verify run is exactly one bmap range and one hash serves
        # both checks. Otherwise runs are cut at RUN_SPLIT so verification hashes in parallel,
        # and a bmap range (SHA-1 in format 1.3) gets its own hash.
        whole = cs_type == "sha256"
        run: Run | None = None
        sha: _Hash = hashlib.sha256()
        rkey: int | None = None
        rstart = rend = 0
        rhash: _Hash | None = None

        closed: list[Run] = []

        def close_run(run: Run) -> None:
            run.digest = sha.digest()
            closed.append(run)
            if whole and rkey is not None:
                run.key = rkey
                self.check_range(rkey, run.start, run.end, sha)

        while True:
            item = self.bufs.get(inq, "data from the image reader")
            if item is END:
                break
            if isinstance(item, Failure):
                raise item.exc
            view = self.bufs.views[item.slot]
            for s, e in item.scan:  # zero detection here: balances the decompressing stage
                item.segs += [(a, b, None) for a, b in
                              nonzero_runs(view[s - item.offset: e - item.offset], s)]
            for s, e, key in item.segs:
                if cs_type and not whole and key != rkey:
                    if rkey is not None and rhash is not None:
                        self.check_range(rkey, rstart, rend, rhash)
                    rkey, rstart, rhash = key, s, hashlib.new(cs_type)
                pos = s
                while pos < e:
                    cut = e if whole else min(e, (pos // RUN_SPLIT + 1) * RUN_SPLIT)
                    if run is None or pos != run.end or (whole and key != rkey) or (
                            not whole and pos % RUN_SPLIT == 0):
                        if run is not None:
                            close_run(run)
                        run, sha = Run(pos, pos), hashlib.sha256()
                        if whole:
                            rkey = key
                    piece = view[pos - item.offset: cut - item.offset]
                    sha.update(piece)
                    if rhash is not None:
                        rhash.update(piece)
                    run.end = pos = cut
                rend = e
            item.runs, closed = closed, []
            self.bufs.put(outq, item)
        if run is not None:
            close_run(run)
        if rkey is not None and rhash is not None:
            self.check_range(rkey, rstart, rend, rhash)
        self.last_runs = closed

    # -- stage 3: write (calling thread) ---------------------------------------------------
    def trusted(self) -> bool:
        """Verifying against a bmap with a SHA-256 for every range (see ``trusted_runs``)."""
        bm = self.bm
        return self.verify and bm is not None and \
            bm.checksum_type == "sha256" and all(r.checksum for r in bm.ranges)

    def in_kernel(self) -> bool:
        """Raw image, trusted bmap, file target: ``kernel_copy`` applies."""
        return isinstance(self.src, RawSource) and self.t.kind == "file" and self.trusted()

    def kernel_copy(self) -> bool:
        """Raw image, trusted bmap, file target: copy_file_range moves each mapped range inside
        the kernel, never through Python; the read-back proves it. False (and nothing done) if
        the kernel cannot copy between these files (e.g. different filesystem types)."""
        bm, src, verifier = self.bm, self.src, self.verifier
        if not self.in_kernel():
            return False
        assert bm is not None and verifier is not None and isinstance(src, RawSource)
        t0, last_end, ahead = time.monotonic(), -1, 0
        self.begin()
        for key, r in enumerate(bm.ranges):
            start, end = bm.byte_range(r)
            while ahead < len(bm.ranges) and bm.byte_range(bm.ranges[ahead])[0] < end + PREFETCH:
                a, b = bm.byte_range(bm.ranges[ahead])  # keep the disk busy ahead of the copy
                os.posix_fadvise(src.fd, a, b - a, os.POSIX_FADV_WILLNEED)
                ahead += 1
            pos = start
            while pos < end:
                try:
                    n = self.tio.copy_range(src.fd, pos, min(4 * CHUNK, end - pos))
                except OSError as exc:
                    if self.written == 0 and exc.errno in (errno.EXDEV, errno.EINVAL,
                                                           errno.EOPNOTSUPP, errno.ENOSYS):
                        return False
                    raise self.io_error(exc, f"at offset {pos}") from exc
                if n == 0:
                    raise InfraError(f"{src.path}: short read before offset {end} (the image "
                                     "changed while being flashed?)", part="flash")
                pos += n
                self.written += n
                self.check_alive(f"during the write (after {self.written} bytes, at offset "
                                 f"{pos})")
                self.report("write", pos, self.size, t0)
            self.ranges += start != last_end
            last_end = end
            verifier.add([Run(start, end, bytes.fromhex(r.checksum or ""), key)])
        self.report("write", self.size, self.size, t0)
        return True

    def write(self) -> None:
        if self.kernel_copy():
            return
        q1: queue.Queue[Any] = queue.Queue(maxsize=SLOTS)
        q2: queue.Queue[Any] = queue.Queue(maxsize=SLOTS)

        def read_stage() -> None:
            for chunk in self.chunks():
                self.bufs.put(q1, chunk)

        stage2 = self.trusted_runs if self.trusted() else self.hash_stage
        threads = [start_stage(read_stage, [q1], self.bufs, "flash-read"),
                   start_stage(lambda: stage2(q1, q2), [q2], self.bufs, "flash-hash")]
        t0 = time.monotonic()
        last_end = 0
        try:
            while True:
                item = self.bufs.get(q2, "data from the hashing stage")
                if item is END:
                    break
                if isinstance(item, Failure):
                    raise item.exc
                self.begin()
                view = self.bufs.views[item.slot]
                for s, e, _key in item.segs:
                    try:
                        self.tio.gap(last_end, s)
                        self.tio.write(view[s - item.offset: e - item.offset], s)
                    except OSError as exc:
                        raise self.io_error(exc, f"at offset {s}") from exc
                    self.written += e - s
                    self.ranges += s != last_end or not self.ranges
                    last_end = e
                self.bufs.release(item.slot)
                if self.verifier is not None:
                    self.verifier.add(item.runs)
                self.check_alive(f"during the write (after {self.written} bytes, at offset "
                                 f"{last_end})")
                done = item.offset + item.length
                self.report("write", done, max(self.size, done), t0)
            self.begin()  # an empty image
            try:
                self.tio.gap(last_end, self.size)
            except OSError as exc:
                raise self.io_error(exc, f"zeroing from offset {last_end}") from exc
        finally:
            self.bufs.stop()
            for th in threads:
                th.join(timeout=5)

    def io_error(self, exc: OSError, where: str) -> InfraError:
        gone = vanished(self.t, self.tio.fd)
        return InfraError(f"writing {self.t} failed {where}: {gone or exc.strerror}",
                          part="flash")

    def check_alive(self, where: str) -> None:
        gone = self.presence.gone()
        if gone:
            raise InfraError(f"{self.t} vanished {where}: {gone}", part="flash")

    def report(self, phase: Phase, done: int, total: int, t0: float) -> None:
        p = FlashProgress(phase, done, total, self.written, time.monotonic() - t0)
        for cb in self.callbacks:
            cb(p)


def flash(source: str | os.PathLike[str] | ImageSource, target: str | os.PathLike[str], *,
          bmap: str | os.PathLike[str] | Bmap | None = None, verify: bool = True,
          zero_fill: bool = False, allow_fixed: bool = False,
          progress: ProgressCallback | None = None, display: bool = True) -> FlashReport:
    """Write ``source`` (raw, gz, xz, zst, zip or bz2 image) to ``target`` (block device or
    regular file) and return what was done.

    Only data is written: the bmap's ranges, else the non-zero blocks (a file target is
    truncated first; on a block device the skipped areas are zeroed by hole punching, or
    written with zeros when ``zero_fill``). With ``verify`` the written ranges are read back past
    the page cache and compared by SHA-256. ``progress`` is called on the calling thread after
    every chunk; ``display`` shows a bar on a TTY, log lines otherwise. Raises InfraError:
    refused target (nothing written), corrupt image, I/O error, vanished target, mismatch.
    """
    t_start = time.monotonic()
    src = source if isinstance(source, ImageSource) else open_source(source)
    try:
        bm = parse_bmap(bmap) if bmap is not None and not isinstance(bmap, Bmap) else bmap
        if bm and src.size is not None and src.size != bm.image_size:
            raise ConfigError(f"describes a {bm.image_size}-byte image but {src.path} is "
                              f"{src.size} bytes: wrong bmap for this image", file=bm.source)
        if bm and src.min_size > bm.image_size:  # gzip: its trailer gives a lower bound
            raise ConfigError(f"describes a {bm.image_size}-byte image but {src.path} holds "
                              f"at least {src.min_size} bytes: wrong bmap for this image",
                              file=bm.source)
        expected = bm.image_size if bm else (src.size or src.min_size or None)
        t = check_target(target, image_size=expected, allow_fixed=allow_fixed,
                         source=src.path if src.local else None)
        tio = TargetIO(t)
        try:
            return _run(src, bm, t, tio, expected or 0, verify, zero_fill, progress, display,
                        t_start)
        except BaseException as exc:
            tio.close()
            if tio.created:  # a half-written file we made would look like an image
                t.path.unlink(missing_ok=True)
            if isinstance(exc, InfraError):
                raise InfraError(f"{exc.message}; {_target_state(t, tio)}", part=exc.part,
                                 rig=exc.rig, tail=exc.tail) from exc
            raise
        finally:
            tio.close()
    finally:
        src.close()


def _target_state(t: Target, tio: TargetIO) -> str:
    """What a failed flash left on the target, for its error message. Data found corrupt only
    after the write began (a truncated stream is seen at its end) leaves a partial image, as
    with bmaptool: the flash fails and nothing reports it verified."""
    if tio.created:
        return f"{t} was removed (this flash had created it)"
    if not tio.prepared:
        return f"nothing was written to {t}"
    return (f"{t} holds an incomplete or unverified image ({tio.written} bytes written): "
            "flash it again")


def _run(src: ImageSource, bm: Bmap | None, t: Target, tio: TargetIO, expected: int,
         verify: bool, zero_fill: bool, progress: ProgressCallback | None, display: bool,
         t_start: float) -> FlashReport:
    shown = make_display(f"{src.path.name} -> {t.path}", display)
    job = _Job(src, bm, t, tio, [cb for cb in (shown, progress) if cb is not None], verify,
               expected, zero_fill)
    try:
        if verify:
            def on_verify(done: int, total: int, elapsed: float) -> None:
                p = FlashProgress("verify", done, total, job.written, elapsed)
                for cb in job.callbacks:
                    cb(p)

            # The kernel copy is limited by the disk alone: reading back at the same time only
            # competes with it (measured slower), so its read-back starts after the last range.
            job.verifier = Verifier(t, tio.fd, src.path, on_verify, bm,
                                    overlap=not job.in_kernel())
        job.write()
        if job.verifier is not None:
            job.verifier.add(job.last_runs)
            job.verifier.written()  # reads now run alongside the final flush
        try:
            tio.finish(job.size)
        except OSError as exc:
            raise job.io_error(exc, "while flushing") from exc
        job.check_alive("at the end of the write")
        t_written = time.monotonic()
        if job.verifier is not None:
            job.verifier.finish()
            job.check_alive("while verifying")
        t_end = time.monotonic()
    finally:
        if job.verifier is not None:
            job.verifier.close()
        job.presence.close()
        job.bufs.close()
        if shown is not None:
            shown.close()
    report = FlashReport(str(src.path), str(t), job.size, job.written, job.ranges,
                         t_end - t_start, t_written - t_start, t_end - t_written,
                         True if verify else None, tio.zeroing)
    log.info("%s", report.summary())
    return report
