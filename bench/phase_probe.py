"""A pytest plugin for ``bench/interrupts.py`` (``-p phase_probe``, with ``bench/`` on the path):
the session writes what it is doing, as it starts and ends it, to ``$HIL_PHASE_FILE``, so the
moment a signal arrived is named by what ran then: the test and its phase (setup, call,
teardown), and the rig step or device command open inside it (``hil.steps``, the spans a report
shows). One line per event: the system's monotonic clock, ``+`` or ``-``, the title."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Generator, Iterator
from typing import IO

import pytest

from hil import steps

_out: IO[str] | None = None


def _write(sign: str, title: str) -> None:
    if _out is not None:
        _out.write(f"{time.monotonic():.3f} {sign} {' '.join(title.split())[:80]}\n")


@contextlib.contextmanager
def _span(title: str) -> Iterator[None]:
    _write("+", title)
    try:
        yield
    finally:
        _write("-", title)


def pytest_configure(config: pytest.Config) -> None:
    global _out
    path = os.environ.get("HIL_PHASE_FILE")
    if path:
        # line-buffered: a killed session loses nothing; open for the session's life
        _out = open(path, "a", buffering=1)  # noqa: SIM115
        steps.listen(_span)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _span(f"setup of {item.name}"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _span(item.name):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    with _span(f"teardown of {item.name}"):
        yield
