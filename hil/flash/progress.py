"""Flash progress: a rich bar on a terminal, a quiet line every few seconds otherwise (CI logs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

log = logging.getLogger("hil.flash")

Phase = Literal["write", "verify"]


class FlashProgress(NamedTuple):
    phase: Phase
    done: int  # write: image bytes covered so far (holes included); verify: bytes read back
    total: int
    written: int  # bytes actually written so far
    elapsed: float  # seconds since the phase started

    @property
    def mb_per_s(self) -> float:
        return self.done / 1e6 / self.elapsed if self.elapsed > 0 else 0.0


ProgressCallback = Callable[[FlashProgress], None]


class LineDisplay:
    """A log line every ``interval`` seconds (the final summary is logged by the writer)."""

    def __init__(self, label: str, interval: float = 5.0) -> None:
        self.label, self.interval = label, interval
        self._last = time.monotonic()

    def __call__(self, p: FlashProgress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        pct = 100.0 * p.done / p.total if p.total else 100.0
        log.info("%s: %s %d/%d MiB (%.0f%%), %d MiB written, %.0f MB/s", self.label, p.phase,
                 p.done >> 20, p.total >> 20, pct, p.written >> 20, p.mb_per_s)

    def close(self) -> None:
        pass


class RichDisplay:
    def __init__(self, label: str) -> None:
        # imported here: rich costs ~30 ms at startup and CI (no TTY) never needs it
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self._label = label
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def __call__(self, p: FlashProgress) -> None:
        task = self._tasks.get(p.phase)
        if task is None:
            task = self._progress.add_task(f"{p.phase} {self._label}", total=p.total)
            self._tasks[p.phase] = task
        self._progress.update(task, completed=p.done, total=p.total)

    def close(self) -> None:
        self._progress.stop()


def make_display(label: str, enabled: bool = True) -> LineDisplay | RichDisplay | None:
    if not enabled:
        return None
    return RichDisplay(label) if sys.stderr.isatty() else LineDisplay(label)
