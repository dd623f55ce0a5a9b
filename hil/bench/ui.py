"""What a bench command shows: its steps (a rich spinner on a terminal, plain lines otherwise),
its lines, and a command's output. The operations (``hil.bench.ops``) report through ``Ui``;
the lock holder (``hil lock``) sends the same reports over its socket (``hil.bench.server``)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

from hil import redact


class Ui(Protocol):
    def line(self, text: str) -> None: ...
    def output(self, text: str, *, err: bool = False) -> None:
        """A command's own output, as it is (no newline added)."""
        ...
    def begin(self, step: str) -> None: ...
    def end(self, step: str, ok: bool, seconds: float) -> None: ...


@contextlib.contextmanager
def step(ui: Ui, text: str) -> Iterator[None]:
    """Report ``text`` as a step while the block runs, then done (with its seconds) or failed."""
    t0 = time.monotonic()
    ui.begin(text)
    try:
        yield
    except BaseException:
        ui.end(text, False, time.monotonic() - t0)
        raise
    ui.end(text, True, time.monotonic() - t0)


class TerminalUi:
    """The user's terminal. Every text is masked (``hil.redact``) before it is shown."""

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._status: Any = None

    def line(self, text: str) -> None:
        print(redact.text(text), flush=True)

    def output(self, text: str, *, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        stream.write(redact.text(text))
        stream.flush()

    def begin(self, step: str) -> None:
        if self.tty:
            # imported here: rich costs ~30 ms at startup and a pipe never needs it
            from rich.console import Console

            self._status = Console().status(redact.text(step) + " …")
            self._status.start()
        else:
            self.line(f"{step} ...")

    def end(self, step: str, ok: bool, seconds: float) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
            mark = "✓" if ok else "✗"
            self.line(f"{mark} {step} ({seconds:.1f}s)")
        else:
            self.line(f"{step}: {'done' if ok else 'FAILED'} ({seconds:.1f}s)")
