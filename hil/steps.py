"""Report steps as they happen: a rig step (power, flash, a wait for a shell) or a command run on
the device opens one for as long as it runs, and whatever listens (allure-pytest, when the run
has ``--alluredir``: ``hil.allure_report``) shows it nested where it ran. Nothing listens
otherwise, and a listener that fails costs the step nothing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

log = logging.getLogger(__name__)
Listener = Callable[[str], AbstractContextManager[object]]
_listeners: list[Listener] = []
TITLE_MAX = 200  # a step's title: a command's first characters


def listen(listener: Listener) -> None:
    _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    with contextlib.suppress(ValueError):
        _listeners.remove(listener)


@contextlib.contextmanager
def span(title: str) -> Iterator[None]:
    """A step titled ``title`` for each listener, around the caller's block; the block's
    exception ends the step as failed and goes on."""
    if not _listeners:
        yield
        return
    title = " ".join(title.split())
    if len(title) > TITLE_MAX:
        title = title[:TITLE_MAX - 1] + "…"
    with contextlib.ExitStack() as stack:
        for listener in list(_listeners):
            stack.enter_context(_quiet(listener, title))
        yield


@contextlib.contextmanager
def _quiet(listener: Listener, title: str) -> Iterator[None]:
    """The listener's step entered and left; its own errors logged, never raised (a report's
    trouble is not the test's)."""
    try:
        inner = listener(title)
        inner.__enter__()
    except Exception as exc:
        log.debug("report step %r not opened: %s", title, exc)
        yield
        return
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            inner.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with contextlib.suppress(Exception):
        inner.__exit__(None, None, None)
