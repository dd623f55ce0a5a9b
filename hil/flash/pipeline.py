"""Plumbing shared by the write and verify pipelines: aligned buffers, stage threads, zero tests.

Stages run on threads and hand page-aligned 4 MiB buffers (O_DIRECT needs the alignment) along
bounded queues. The heavy work (hashing, decompression, pread/pwrite) releases the GIL, so the
stages really overlap. A failing stage forwards its exception; the others stop at ``abort``.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
from collections.abc import Callable
from typing import Any

from hil.errors import DeadlineError

CHUNK = 4 << 20  # bytes per read/write: large enough that per-call Python overhead vanishes
BLOCK = 4096  # zero-detection granularity (and bmaptool's usual block size)
SLOTS = 8  # buffers in flight between the stages
STALL_TIMEOUT = 300.0  # a stage that gets nothing for this long is stuck


class Abort(Exception):
    """Another stage failed; this one stops quietly."""


class Failure:
    """An exception raised in a stage thread, travelling to the main thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


END = object()  # end of a stage's output
_WAKE = object()  # put by ``Buffers.stop``: a stage waiting on a queue looks at the abort flag

_zeros: dict[int, bytearray] = {}


def is_zero(view: memoryview) -> bool:
    # bytearray == memoryview compares with memcmp: no copy, no per-byte Python work
    zero = _zeros.get(len(view))
    if zero is None:
        zero = _zeros[len(view)] = bytearray(len(view))
    return zero == view


def nonzero_runs(view: memoryview, base: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """[start, end) image ranges of ``view`` (at image offset ``base``) not entirely zero.

    Tests 256 KiB sub-blocks before single blocks, so zero areas cost one memcmp each. A final
    partial block is always kept, so the image's last bytes are written explicitly.
    """
    n = len(view)
    runs: list[tuple[int, int]] = []
    if n >= block and n % block == 0 and is_zero(view):
        return runs
    step = 64 * block
    for sub in range(0, n, step):
        sub_end = min(sub + step, n)
        if sub_end - sub == step and is_zero(view[sub:sub_end]):
            continue
        for off in range(sub, sub_end, block):
            end = min(off + block, n)
            if end - off == block and is_zero(view[off:end]):
                continue
            if runs and runs[-1][1] == base + off:
                runs[-1] = (runs[-1][0], base + end)
            else:
                runs.append((base + off, base + end))
    return runs


class Buffers:
    """A pool of aligned buffers plus the abort flag all stages watch."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.maps = [mmap.mmap(-1, CHUNK) for _ in range(slots)]
        self.views = [memoryview(m) for m in self.maps]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self.free.put(i)
        self.abort = threading.Event()
        self._queues: set[queue.Queue[Any]] = {self.free}  # every queue a stage waits on

    def acquire(self) -> int:
        slot: int = self.get(self.free, "a free buffer (the writer is stuck?)")
        return slot

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def get(self, q: queue.Queue[Any], what: str, timeout: float | None = STALL_TIMEOUT
            ) -> Any:
        """Blocking get that gives up on abort or after ``timeout`` (None: only on abort)."""
        self._queues.add(q)
        waited = 0.0
        while True:
            if self.abort.is_set():
                raise Abort()
            try:
                item = q.get(timeout=0.2)
                if item is not _WAKE:
                    return item
            except queue.Empty:
                waited += 0.2
                if timeout is not None and waited > timeout:
                    raise DeadlineError(what, "no progress", timeout) from None

    def put(self, q: queue.Queue[Any], item: object) -> None:
        self._queues.add(q)
        while not self.abort.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise Abort()

    def stop(self) -> None:
        """Abort every stage now: a stage blocked on a queue wakes at once rather than at its
        next poll (a failed flash would otherwise wait that long for each of them)."""
        self.abort.set()
        for q in list(self._queues):
            with contextlib.suppress(queue.Empty):
                while True:  # make room for a stage blocked in put; nothing is taken now
                    q.get_nowait()
            with contextlib.suppress(queue.Full):
                q.put_nowait(_WAKE)

    def close(self) -> None:
        try:
            for v in self.views:
                v.release()
            for m in self.maps:
                m.close()
        except BufferError:  # a stage that did not stop still holds a slice: GC frees it
            pass


def start_stage(fn: Callable[[], None], outs: list[queue.Queue[Any]], bufs: Buffers,
                name: str) -> threading.Thread:
    """Run ``fn`` on a daemon thread; END (or the Failure) goes to every queue in ``outs``."""

    def run() -> None:
        result: object = END
        try:
            fn()
        except Abort:
            return
        except BaseException as exc:  # forwarded to the main thread, which re-raises it
            result = Failure(exc)
        try:
            for q in outs:
                bufs.put(q, result)
        except Abort:
            pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
