"""Host OS updates and rollbacks: a good update switches the active root, commits and leaves no
markers; a new OS that cannot boot falls back through the bootloader's counter; one that boots
but stays unhealthy falls back through the health check; a power cut at any moment of an update
leaves a device that boots the old or the new OS, never neither; /data survives all of it.
Across the good update and the health check's rollback the app (suites/apps.py) runs again with
its /data and named volume as it left them, and the good update keeps the device's identity:
each update is checked for every promise made across it (an update costs minutes under QEMU).

Each test starts from whatever root is active (the previous test may have switched it).
"""

from __future__ import annotations

import random
import time

import pytest
from apps import APP_VOLUMES, SERVICE, Apps
from identity import identity, identity_changes, wait_registered

from hil.appregistry import AppRegistry
from hil.dut import Dut
from hil.errors import DeadlineError, DeviceError
from hil.os import BootRecord, HostOS, UpdateImage
from hil.os.flows import boot_broken_health, boot_broken_init, boot_good, install
from hil.os.parse import BootState
from hil.os.updates import UpdateSet
from hil.session import HilSession

DATA_FILE = "rollback-suite"


@pytest.fixture
def data_file(host_os: HostOS) -> str:
    """A checksummed file in /data before the update; each test checks it after."""
    host_os.put_checked_file(DATA_FILE)
    return DATA_FILE


def _data_survived(host_os: HostOS, name: str, after: str) -> None:
    problem = _data_problem(host_os, name, after)
    assert problem is None, problem


def _data_problem(host_os: HostOS, name: str, after: str) -> str | None:
    problem = host_os.checked_file(name)
    return None if problem is None else f"/data did not survive {after}: {problem}"


def _all_kept(problems: list[str | None]) -> None:
    """Every promise checked after one update, so a failure lists all that were broken."""
    broken = [p for p in problems if p]
    assert not broken, "\n".join(broken)


def test_good_update_switches_root_commits_and_leaves_no_markers(
        dut: Dut, host_os: HostOS, update_image: UpdateImage, updates: UpdateSet,
        app_registry: AppRegistry | None, data_file: str, apps: Apps, app: dict[str, str],
        hil_session: HilSession, pytestconfig: pytest.Config) -> None:
    """The bootloader's steps of a good update, then what it keeps: the file in /data, the app
    running with its volumes, the device's identity (uuid, hostname, device API key, SSH host
    key, no second registration). With ``--update-from-registry``, where the device can pull
    from the rig host's registry, the update is a hostapp image there (`hostapp-update -i`), as
    a fleet gets its host OS updates."""
    if pytestconfig.getoption("--update-from-registry"):
        update_image = updates.from_registry(update_image, app_registry)
    if hil_session.api is not None:
        wait_registered(dut, host_os)  # a key stored mid-test would read as a changed identity
    vpn = _vpn_expected(host_os, hil_session)
    if vpn:  # online before: the health check commits the update only if it comes back
        host_os.wait_vpn()
    was = identity(dut, host_os)
    apps.write_marks(app[SERVICE], APP_VOLUMES, "before-update")
    inst = install(host_os, update_image)
    recorded = host_os.health_variables().get("BALENAOS_ROLLBACK_VPNONLINE")
    boot_good(dut, host_os, inst)
    after = f"a good update {inst.old_version} -> {host_os.version()}"
    _all_kept([_data_problem(host_os, data_file, after),
               apps.volumes_kept(after, "before-update"),
               identity_changes(after, was, identity(dut, host_os), hil_session),
               _vpn_recorded(recorded, vpn)])
    if vpn:
        host_os.wait_vpn(timeout=30)  # the health check found it online: it stays so


def _vpn_expected(host_os: HostOS, hil_session: HilSession) -> bool:
    """Whether the device's VPN is to come online: the session's API serves one (os-config may
    not have written its configuration yet), or the device has one from its own API."""
    return hil_session.vpn is not None or host_os.vpn_configured()


def _vpn_recorded(recorded: str | None, online: bool) -> str | None:
    """hostapp-update records the VPN's state before the update, for the health check."""
    want = "1" if online else "0"
    if recorded == want:
        return None
    return (f"hostapp-update must record the VPN {'online' if online else 'offline'} as it was "
            f"(BALENAOS_ROLLBACK_VPNONLINE={want} in rollback-health-variables); it recorded "
            f"{recorded!r}")


def test_unbootable_update_falls_back_through_the_bootloader_counter(
        dut: Dut, host_os: HostOS, update_image: UpdateImage, data_file: str) -> None:
    inst = install(host_os, update_image)
    boot_broken_init(dut, host_os, inst)  # its init deleted in place
    _data_survived(host_os, data_file, "an update that could not boot and its rollback")


def test_unhealthy_update_falls_back_through_the_health_check(
        dut: Dut, host_os: HostOS, update_image: UpdateImage, data_file: str, apps: Apps,
        app: dict[str, str]) -> None:
    """The new OS boots with /data mounted and the app's volumes there, stays unhealthy, and
    the health check rolls it back: the old OS runs the app again with its volumes."""
    apps.write_marks(app[SERVICE], APP_VOLUMES, "before-rollback")
    inst = install(host_os, update_image)
    boot_broken_health(dut, host_os, inst, count=2, timeout=1)  # broken in place
    after = "an unhealthy update and its rollback"
    _all_kept([_data_problem(host_os, data_file, after),
               apps.volumes_kept(after, "before-rollback")])


def test_update_whose_vpn_does_not_come_back_falls_back_through_the_health_check(
        dut: Dut, host_os: HostOS, update_image: UpdateImage, data_file: str,
        hil_session: HilSession) -> None:
    """balenaOS's "Broken VPN": the VPN is online before the update, so hostapp-update records
    it for the health check; the new OS's openvpn is /dev/null, its VPN never connects, and
    the health check rolls the update back. The old OS brings the VPN back."""
    if not _vpn_expected(host_os, hil_session):
        why = f": {hil_session.no_vpn}" if hil_session.no_vpn else ""
        pytest.skip(f"the device has no VPN configuration from its API (/etc/openvpn/openvpn.conf)"
                    f"{why}")
    host_os.wait_vpn()
    inst = install(host_os, update_image)
    problem = _vpn_recorded(host_os.health_variables().get("BALENAOS_ROLLBACK_VPNONLINE"), True)
    assert problem is None, problem
    boot_broken_health(dut, host_os, inst, count=2, timeout=1, what="vpn")
    host_os.wait_vpn()
    _data_survived(host_os, data_file, "an update whose VPN did not come back, and its rollback")


# --- power cuts during an update ---------------------------------------------------------------

def _boot_after_cut(dut: Dut, host_os: HostOS, when: str) -> list[BootRecord]:
    """Power on and wait for a shell, letting the bootloader retry roots that panic (a fallback
    through the counter is a bootable device too). Fails the test if no OS comes up."""
    from hil.os.balena import BOOTLIMIT

    boots: list[BootRecord] = []
    at = dut.rig.log.end
    dut.rig.power_on()  # after the rig's off-time; the boots are followed below
    deadline = time.monotonic() + dut.timeouts.boot * (BOOTLIMIT + 2)
    while True:
        try:
            rec = dut.await_boot(at, max(1.0, deadline - time.monotonic()))
            boots.append(rec)
            at = rec.end
            dut.wait_ready(max(1.0, deadline - time.monotonic()))
            return boots
        except DeviceError:
            continue  # a panicking root: the bootloader counts it and tries again
        except DeadlineError as exc:
            seen = "; ".join(str(b) for b in boots) or "no boot"
            raise AssertionError(f"after a power cut {when} the device boots neither the old "
                                 f"nor the new OS (boots: {seen}): {exc}") from None


@pytest.mark.parametrize("moment", ["while writing", "after hostapp-update returned"])
def test_power_cut_during_an_update_leaves_a_bootable_device(
        dut: Dut, host_os: HostOS, update_image: UpdateImage, data_file: str, moment: str,
        pytestconfig: pytest.Config) -> None:
    old_version = host_os.version()
    image = update_image
    roots = host_os.roots()
    disk = dut.disk
    when = f"{moment} ({image.describe()})"
    completed = False
    if moment == "while writing":
        seed = int(pytestconfig.getoption("--power-cut-seed"))
        # the write dominates an update: cut at a seeded moment from its start to just past
        # its end (the bootloader's switch is the update's last step)
        given = pytestconfig.getoption("--update-seconds")
        expected = float(given or host_os.last_update_seconds or 8.0)
        delay = random.Random(seed).uniform(0.05, 1.05) * expected
        running, stop_serving = host_os.start_hostapp_update(image)
        try:
            time.sleep(delay)  # deliberate: the moment of the cut is the point of the test
            code = running.finished()
            dut.power_off()
        finally:
            running.abandon()
            stop_serving()
        completed = code == 0
        when += f", {delay:.1f}s in (seed {seed}){'; it had completed' if completed else ''}"
    else:
        took = host_os.hostapp_update(image).seconds
        dut.power_off()
        completed = True
        when += f"; hostapp-update took {took:.1f}s"
    stored = disk.boot_state() if disk is not None else None
    boots = _boot_after_cut(dut, host_os, when)
    now = host_os.roots()
    assert now.active in (roots.active, roots.inactive), f"unexpected active root {now.active}"
    on_new = now.active == roots.inactive
    # the soak's figures (-rP shows them): docs/reliability.md
    print(f"power cut {when}: back on the {'new' if on_new else 'old'} OS ({now.active}) "
          f"after {len(boots)} boot(s)")
    if completed:
        assert on_new, (f"hostapp-update had reported success {when}, but after the power "
                        f"cut the device runs the old root {now.active}; the update was lost")
    if on_new:
        state = host_os.wait_committed()
        assert state == BootState(roots.inactive.number, 0, 0), state
        if image.version:
            assert host_os.version() == image.version, (
                f"the new root {now.active} is active but VERSION is {host_os.version()}")
    else:
        assert host_os.version() == old_version, (
            f"back on the old root {now.active} but VERSION is {host_os.version()}")
        state = host_os.boot_state()
        assert state.resin_root_part == roots.active.number and state.upgrade_available == 0, (
            f"the device runs the old root but the bootloader is left with {state} "
            f"(stored at the cut: {stored}; boots: {'; '.join(map(str, boots))})")
    _data_survived(host_os, data_file, f"a power cut {when}")
