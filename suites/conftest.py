"""Fixtures shared by the OS suites. Suites talk only to fixtures (``dut``, ``rig``), never to a
driver, so each runs unchanged on a bench board and on a QEMU board.

- ``host_os``: the device's host-OS adapter (``dut.os``: the ``HostOS`` interface of
  hil/os/contract.py), in balenaOS's words.
- ``updates``: host OS update images for the session (``--update-image``; built on the
  reference OS), shared by every test that updates; ``update_image``: one for the OS the
  device runs now, or a skip.
- ``app_registry``: a container registry on the rig host (hil/appregistry.py) serving TLS
  with a certificate of the session's CA, which the device trusts through config.json's
  ``balenaRootCA``; None where the device cannot use it (no rig network, a config.json without
  the CA, ``HIL_APP_REGISTRY=off``). ``HIL_APP_REGISTRY_PORT`` picks its port (default: a
  free one).
- ``app_image``: busybox as an app container image on the device, its name there: pushed to
  ``app_registry`` and pulled by the device's engine, or where there is no registry sent with
  ``balena-engine load`` over SSH; a skip where the OS runs no containers. ``gpiod_image``:
  the same with libgpiod's tools (Debian's gpiod); ``dmsetup_image``: with the device mapper's
  tool (Debian's dmsetup).
- ``apps``: the supervisor's local-mode API and the engine's CLI on the device (apps.py);
  ``app``: the suites' single-container app running (deployed when it is not), service name
  -> container ID.
- ``--power-cuts N`` / ``--power-cut-seed S``: how many random power cuts the persistence
  suite's fault injection makes, and the seed that picks their moments; ``--update-seconds``:
  how long a whole host OS update takes on the rig, over which the rollback suite spreads its
  cut during an update.
- ``--update-from-registry``: the rollback suite's good update through the rig host's registry.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator

import pytest
from apps import Apps, release_service, target

from hil.appregistry import AppRegistry
from hil.dut import Dut
from hil.os import HostOS, UpdateImage, UpdateSet
from hil.refos import appimage
from hil.rig import Rig
from hil.session import HilSession


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil-suites", "pytest-hil OS suites")
    g.addoption("--power-cuts", type=int, default=3,
                help="random power cuts during writes to /data (persistence suite; default 3, "
                     "as CI runs it; use e.g. 50 for a soak)")
    g.addoption("--power-cut-seed", type=int, default=1,
                help="seed for the moments of the power cuts (default 1; printed in failures "
                     "to reproduce a run)")
    g.addoption("--update-seconds", type=float, default=None,
                help="how long a whole host OS update takes on this rig (the rollback suite "
                     "prints it as 'hostapp-update took'): the cut during an update falls at a "
                     "seeded moment of it. Default: the session's last update, else 8 s")
    g.addoption("--update-image", default=None,
                help="an OS image for host OS update and rollback tests: a hostapp bundle, an "
                     "image reference or an ext4 rootfs (built on the reference OS). The "
                     "rollback tests break it in place once installed, as balenaOS's do")
    g.addoption("--update-from-registry", action="store_true",
                help="the rollback suite's good update comes as a hostapp image from the rig "
                     "host's registry (`hostapp-update -i`, as a fleet gets it) where the "
                     "device can pull from it; default: the file, served on the rig's network "
                     "(`-f`), which under QEMU's emulation takes minutes less")


@pytest.fixture
def host_os(dut: Dut) -> HostOS:
    """balenaOS's contract on the device (``hil.os.HostOS``): config.json, units and their
    journal, the supervisor's API, host OS updates, the bootloader's state."""
    return dut.os


@pytest.fixture(scope="session")
def updates(pytestconfig: pytest.Config, hil_session: HilSession) -> UpdateSet:
    """The host OS updates the session can apply: ``--update-image``, else the reference OS's
    own next version where the device runs the reference OS."""
    assert hil_session.dut is not None
    given = pytestconfig.getoption("--update-image")
    return UpdateSet(
        refos_arch=hil_session.refos_arch if hil_session.dut.os.is_reference_os else None,
        given=UpdateImage.from_option(given) if given else None)


@pytest.fixture
def update_image(updates: UpdateSet, host_os: HostOS) -> UpdateImage:
    """A good update for the OS the device runs now (another VERSION where there is one);
    the test skips where the session has none."""
    image = updates.good(host_os.version())
    if image is None:
        pytest.skip(updates.missing_reason())
    return image


@pytest.fixture(scope="session")
def app_registry(hil_session: HilSession, rig: Rig) -> Iterator[AppRegistry | None]:
    """The rig host's registry for app images, or None where the device cannot pull from it
    (then images go over SSH)."""
    dut = hil_session.dut
    assert dut is not None
    trusted = base64.b64decode(dut.os.config_json().get("balenaRootCA") or "")
    if (rig.network is None or hil_session.ca.pem not in trusted
            or os.environ.get("HIL_APP_REGISTRY", "on") == "off"):
        yield None
        return
    with AppRegistry(hil_session.ca, hil_session.runtime / "registry",
                     rig.network.host_address, rig=rig.name,
                     port=int(os.environ.get("HIL_APP_REGISTRY_PORT", "0"))) as registry:
        yield registry


def deliver(host_os: HostOS, registry: AppRegistry | None,
            build: Callable[[str], appimage.AppImage]) -> str:
    """The image ``build`` makes for the device's architecture, held by its engine (built
    reproducibly, so a device that has it is sent nothing): its name there."""
    if not host_os.has_engine():
        pytest.skip("the OS runs no containers: it has no balena-engine")
    image = build(host_os.check("uname -m").strip())
    if registry is None:
        return host_os.load_image(image)
    return host_os.pull_image(registry.push(image.path, image.tag), image)


@pytest.fixture
def app_image(host_os: HostOS, app_registry: AppRegistry | None) -> str:
    """busybox-static from Debian, for the device's architecture."""
    return deliver(host_os, app_registry, appimage.busybox)


@pytest.fixture
def gpiod_image(host_os: HostOS, app_registry: AppRegistry | None) -> str:
    """libgpiod's tools (Debian's gpiod) and busybox, for the device's architecture."""
    return deliver(host_os, app_registry, appimage.gpiod)


@pytest.fixture
def dmsetup_image(host_os: HostOS, app_registry: AppRegistry | None) -> str:
    """The device mapper's tool (Debian's dmsetup) and busybox, for the device's architecture."""
    return deliver(host_os, app_registry, appimage.dmsetup)


@pytest.fixture
def apps(host_os: HostOS, app_image: str) -> Apps:
    """Apps deployed through the supervisor's local-mode API, and the engine's CLI into their
    containers (``suites/apps.py``)."""
    return Apps(host_os)


@pytest.fixture
def app(apps: Apps, app_image: str) -> dict[str, str]:
    """The suites' single-container app running: service name -> container ID."""
    return apps.deploy(target({"main": release_service(app_image)}))
