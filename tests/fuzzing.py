"""Shared by the fuzz tests: damage done to a valid input, digests of the files a case must
leave alone, and the settings every fuzz test runs with (repeatable in CI)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hil.errors import ConfigError, HilError, InfraError
from hil.flash.writer import FlashReport

# 1000 cases each, the same ones on every run: derandomized, no example database
FUZZ = settings(max_examples=1000, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

# headers and trailers hold what parsers trust most: aim there as often as anywhere else
position = st.one_of(st.integers(0, 40), st.integers(-40, -1), st.integers(0, 1 << 24))
Damage = tuple[str, int, bytes]
damage_op = st.one_of(
    st.tuples(st.just("cut"), position, st.just(b"")),  # keep bytes [0, pos)
    st.tuples(st.just("flip"), position, st.integers(0, 7).map(lambda b: bytes([1 << b]))),
    st.tuples(st.just("put"), position, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=12)),
)
damages = st.lists(damage_op, min_size=1, max_size=3)


def damaged(blob: bytes, ops: list[Damage]) -> bytes:
    """``blob`` with each op applied; positions wrap around (negative ones count from the end)."""
    out = bytearray(blob)
    for op, pos, data in ops:
        at = pos % len(out) if out else 0
        if op == "cut":
            del out[at:]
        elif op == "flip" and out:
            out[at] ^= data[0]
        elif op == "put":
            out[at:at + len(data)] = data
        else:
            out[at:at] = data
    return bytes(out)


def digest(path: Path) -> str | None:
    """SHA-256 of the file's content, None if there is no file. A sparse file is read by its
    data extents (their places are hashed too: a write into a hole changes them), so a large
    mostly empty image costs little; where SEEK_DATA is not supported, the whole file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    sha = hashlib.sha256()
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                stop = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                start, stop = pos, end
            sha.update(f"{start}-{stop}:".encode())
            sha.update(os.pread(fd, stop - start, start))
            pos = stop
    finally:
        os.close(fd)
    return sha.hexdigest()


def flash_outcome(run: Callable[[], FlashReport], inputs: list[Path], target: Path,
                  named: list[Path]) -> FlashReport | HilError:
    """Run one flash of bad input and hold it to the promise: the report, or one of our
    errors naming one of ``named``; the inputs unchanged; the target byte-for-byte as it was
    unless the error says it must be flashed again (the write had begun), and a target the
    flash created gone. Any other exception propagates: it fails the case."""
    before = {p: digest(p) for p in [*inputs, target]}
    try:
        result: FlashReport | HilError = run()
    except (ConfigError, InfraError) as exc:
        result = exc
        message = str(exc)
        assert any(str(p) in message for p in named), message
        if before[target] is None:
            assert not target.exists(), message
        elif "holds an incomplete or unverified image" not in message:  # nothing written
            assert digest(target) == before[target], message
    for p in inputs:
        assert digest(p) == before[p], f"{p} changed"
    return result
