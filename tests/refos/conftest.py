"""Fixtures for the reference OS integration tests: one build of each image per session,
a private disk copy per test, QEMU guests that are always killed, a registration server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from refos_guest import ARCHES, Guest, Images

from hil.refos import build
from hil.refos.qemu import qemu_argv


@pytest.fixture(scope="session", params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    a = str(request.param)
    if shutil.which(qemu_argv(a, Path("x"))[0]) is None:
        pytest.skip(f"no QEMU for {a}")
    return a


@pytest.fixture(scope="session")
def images(arch: str) -> Images:
    """One build of each image per session (cached across sessions by input hash)."""
    return Images(v1=build(arch, "1.0.0"), v2=build(arch, "2.0.0"))


@pytest.fixture
def disk(images: Images, tmp_path: Path) -> Path:
    """A private copy of the v1 disk, as if flashed onto this test's board."""
    dst = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(images.v1.disk), str(dst)], check=True)
    return dst


@pytest.fixture
def guest_factory(arch: str, images: Images, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def make(disk: Path) -> Guest:
        g = Guest(arch, disk, tmp_path / f"console-{len(guests)}.log",
                  uboot_env=images.v1.uboot_env)
        guests.append(g)
        return g

    yield make
    for g in guests:
        g.close()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for g in guests:
            print(f"--- console log {g.log_path} (tail) ---\n{g.tail(6000)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
