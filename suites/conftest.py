"""Fixtures shared by the OS suites. Suites talk only to fixtures (``dut``, ``rig``), never to a
driver, so each runs unchanged on a bench board and on a QEMU board.

- ``host_os``: the device's host-OS adapter (``dut.os``: the ``HostOS`` interface of
  hil/os/contract.py), in balenaOS's words.
- ``updates``: host OS update images for the session (``--update-image``; built on the
  reference OS), shared by every test that updates.
- ``--power-cuts N`` / ``--power-cut-seed S``: how many random power cuts the persistence
  suite's fault injection makes, and the seed that picks their moments.
"""

from __future__ import annotations

import pytest

from hil.dut import Dut
from hil.os import HostOS, UpdateSet
from hil.session import HilSession


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil-suites", "pytest-hil OS suites")
    g.addoption("--power-cuts", type=int, default=3,
                help="random power cuts during writes to /data (persistence suite; default 3, "
                     "as CI runs it; use e.g. 50 for a soak)")
    g.addoption("--power-cut-seed", type=int, default=1,
                help="seed for the moments of the power cuts (default 1; printed in failures "
                     "to reproduce a run)")
    g.addoption("--update-image", default=None,
                help="an OS image for host OS update tests: a hostapp bundle, an image "
                     "reference or an ext4 rootfs (built on the reference OS)")
    g.addoption("--update-image-broken-init", default=None,
                help="an update whose new OS cannot boot (rollback suite on real devices; "
                     "built on the reference OS)")
    g.addoption("--update-image-broken-health", default=None,
                help="an update whose new OS boots but never passes the health check "
                     "(rollback suite on real devices; built on the reference OS)")


@pytest.fixture
def host_os(dut: Dut) -> HostOS:
    return dut.os


@pytest.fixture(scope="session")
def updates(pytestconfig: pytest.Config, hil_session: HilSession) -> UpdateSet:
    assert hil_session.dut is not None
    opt = pytestconfig.getoption
    return UpdateSet.from_options(
        refos_arch=hil_session.refos_arch if hil_session.dut.os.is_reference_os else None,
        update_image=opt("--update-image"),
        broken={"init": opt("--update-image-broken-init"),
                "health": opt("--update-image-broken-health")})
