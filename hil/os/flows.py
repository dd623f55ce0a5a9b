"""Host OS update flows as the contract describes them, each step asserted: install into the
inactive root, boot the new OS and commit, or fall back through the bootloader counter or the
health check. Shared by the persistence and rollback suites; every assertion message names the
promise that was broken."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from hil.errors import DeadlineError, OSContractError
from hil.os.balena import BOOTLIMIT, BREADCRUMBS
from hil.os.contract import BootRecord, HostOS, RootPart, UpdateResult, check
from hil.os.parse import BootState
from hil.os.updates import UpdateImage

if TYPE_CHECKING:
    from hil.dut import Dut


@dataclass
class Installed:
    """An update written by ``hostapp-update`` and not booted yet."""

    image: UpdateImage
    old: RootPart
    new: RootPart
    old_version: str
    result: UpdateResult
    health_variables: dict[str, str]  # as hostapp-update left them: no test may change them
    boots: list[BootRecord] = field(default_factory=list)


def install(host_os: HostOS, image: UpdateImage) -> Installed:
    """hostapp-update, then the contract's state before the reboot: the bootloader points at
    the new root for a trial (upgrade_available=1, bootcount=0), both breadcrumbs are there,
    the new root holds the new VERSION, the old root is untouched and still active."""
    roots = host_os.roots()
    old_version = host_os.version()
    result = host_os.hostapp_update(image)
    check(result.target == roots.inactive,
          f"hostapp-update wrote {result.target}, not the inactive root {roots.inactive}")
    state = host_os.boot_state()
    want = BootState(roots.inactive.number, 1, 0)
    check(state == want,
          f"after hostapp-update the bootloader must try the new root once: "
          f"want {want}, have {state}")
    markers = host_os.rollback_markers()
    check(markers == set(BREADCRUMBS),
          f"hostapp-update must leave exactly the breadcrumbs {sorted(BREADCRUMBS)} in "
          f"/mnt/state; found {sorted(markers) or 'none'}")
    after = host_os.roots()
    check(after.active == roots.active,
          "hostapp-update changed the running root")
    check(after.inactive.label == roots.inactive.label,
          f"the new root lost its label {roots.inactive.label} (now {after.inactive.label})")
    if image.version:
        new_version = host_os.version("/mnt/sysroot/inactive")
        check(new_version == image.version,
              f"the inactive root holds VERSION {new_version}, the update is {image.version}")
    variables = host_os.health_variables()
    check("BALENAOS_ROLLBACK_VPNONLINE" in variables,
          "hostapp-update must record the VPN's state for the health check "
          f"(BALENAOS_ROLLBACK_VPNONLINE in /mnt/state/rollback-health-variables); it holds "
          f"{variables or 'nothing'}")
    return Installed(image, roots.active, roots.inactive, old_version, result, variables)


def _assert_boot(rec: BootRecord, root: int, want: BootState, what: str) -> None:
    """Both views of one boot — what the bootloader printed, what it stored — against the
    contract (each only where the rig can observe it)."""
    if rec.printed is not None:
        check(rec.printed.root == root and rec.printed.state == want,
              f"{what}: the bootloader should boot root {root} with {want}; it printed root "
              f"{rec.printed.root} with {rec.printed.state}")
    if rec.stored is not None:
        check(rec.stored == want,
              f"{what}: the boot partition should hold {want}; it holds "
              f"{rec.stored}")


# balenaOS's health check waits TIMEOUT (60 s) before its first check; a good update needs
# only that first one, so the wait is shortened (the checks themselves are not).
GOOD_HEALTH_CHECK = (15, 5)  # COUNT, TIMEOUT


def boot_good(dut: Dut, host_os: HostOS, inst: Installed, commit_timeout: float = 420.0
              ) -> None:
    """Reboot into a good update: the first boot is a counted trial of the new root, the
    health check commits, no markers are left, the new root is active with the new VERSION.
    ``commit_timeout`` covers the engine's start and the health check's container run (most
    of a minute each under QEMU's emulation)."""
    host_os.shorten_health_check(*GOOD_HEALTH_CHECK)
    at = dut.start_reboot()
    rec = dut.await_boot(at)
    inst.boots.append(rec)
    _assert_boot(rec, inst.new.number, BootState(inst.new.number, 1, 1),
                 "first boot after the update")
    dut.wait_ready()
    state = host_os.wait_committed(commit_timeout)
    check(state == BootState(inst.new.number, 0, 0),
          f"a committed update must leave resin_root_part={inst.new.number} "
          f"upgrade_available=0 bootcount=0; have {state}")
    markers = host_os.rollback_markers()
    check(not markers,
          f"a good update must leave no rollback markers; found {sorted(markers)}")
    roots = host_os.roots()
    check(roots.active == inst.new,
          f"after a good update {inst.new} must be active; {roots.active} is")
    check(roots.mounted_active == inst.new.device,
          f"/mnt/sysroot/active is {roots.mounted_active}, the active root is {inst.new.device}")
    if inst.image.version:
        check(host_os.version() == inst.image.version,
              f"after a good update VERSION must be {inst.image.version}; it is "
              f"{host_os.version()}")


def assert_back_on_old(host_os: HostOS, inst: Installed, marker: str) -> None:
    """After a rollback: the old root active with the old VERSION, the bootloader committed
    to it, only ``marker`` left in /mnt/state."""
    roots = host_os.roots()
    check(roots.active == inst.old,
          f"after the rollback {inst.old} must be active; "
          f"{roots.active} is")
    check(roots.mounted_active == inst.old.device,
          f"/mnt/sysroot/active is {roots.mounted_active}, the active root is {inst.old.device}")
    version = host_os.version()
    check(version == inst.old_version,
          f"after the rollback VERSION must be the old {inst.old_version}; it is {version}")
    state = host_os.boot_state()
    check(state == BootState(inst.old.number, 0, 0),
          f"after the rollback the bootloader must be back on {inst.old.number} with no trial "
          f"pending (upgrade_available=0 bootcount=0); have {state}")
    markers = host_os.rollback_markers()
    check(markers == {marker},
          f"after the rollback /mnt/state must hold {marker} (and no "
          f"breadcrumb); it holds {sorted(markers) or 'nothing'}")
    variables = host_os.health_variables()
    check(variables == inst.health_variables,
          f"rollback-health-variables changed: {inst.health_variables} after the update, "
          f"{variables} after the rollback")


def boot_broken_init(dut: Dut, host_os: HostOS, inst: Installed) -> None:
    """Break the installed update's init in place and reboot into it: each failed boot counts
    (bootcount 1..limit with upgrade_available=1, asserted per boot where the rig can see it),
    the next one boots the old root, whose rollback-altboot sets rollback-altboot-triggered,
    points the bootloader back and reboots."""
    host_os.break_update("init")
    at = dut.start_reboot()
    if host_os.is_reference_os:  # its bootloader prints each decision: follow every boot
        for count in range(1, BOOTLIMIT + 1):
            rec = dut.await_boot(at)
            inst.boots.append(rec)
            _assert_boot(rec, inst.new.number, BootState(inst.new.number, 1, count),
                         f"failed boot {count} of the new root")
            at = dut.await_panic(rec.end, dut.timeouts.boot)
        rec = dut.await_boot(at)
        inst.boots.append(rec)
        _assert_boot(rec, inst.old.number, BootState(inst.new.number, 1, BOOTLIMIT + 1),
                     f"boot {BOOTLIMIT + 1}: a bootcount over the limit must boot the old root")
        # the old OS's rollback-altboot restores the bootloader state and reboots once more,
        # before the OS reports ready
        with dut.rig.log.tally.timing("boot"):
            hit = dut.rig.log.wait_for(re.compile(rb"HIL-BOOT: |HIL-READY "), rec.end,
                                       dut.timeouts.boot, "rollback-altboot to reboot the old OS")
        check(hit.data.startswith(b"HIL-BOOT"),
              "the old OS came up after the fallback boot without running rollback-altboot "
              "(no reboot into a consistent old state); the bootloader is left on the failed "
              "update")
        rec = dut.await_boot(rec.end)
        inst.boots.append(rec)
        _assert_boot(rec, inst.old.number, BootState(inst.old.number, 0, 0),
                     "the boot after rollback-altboot")
    dut.wait_ready(dut.timeouts.boot * (BOOTLIMIT + 2))
    assert_back_on_old(host_os, inst, "rollback-altboot-triggered")


def boot_broken_health(dut: Dut, host_os: HostOS, inst: Installed, *, count: int = 2,
                       timeout: int = 1, what: Literal["health", "vpn"] = "health") -> None:
    """Break what the installed update's health check needs (``what``: balenaEngine, or the
    VPN), in place, and reboot into it: the trial boot counts once, the health check
    (shortened to ``count`` checks ``timeout`` s apart in the new root) gives up, sets
    rollback-health-triggered, points the bootloader back and reboots into the old root."""
    host_os.break_update(what)
    host_os.shorten_health_check(count, timeout)
    at = dut.start_reboot()
    rec = dut.await_boot(at)
    inst.boots.append(rec)
    _assert_boot(rec, inst.new.number, BootState(inst.new.number, 1, 1),
                 "the trial boot of the unhealthy update")
    wait = dut.timeouts.boot + count * (timeout + 10)
    try:
        nxt = dut.await_boot(rec.end, wait)
    except DeadlineError as exc:
        raise OSContractError(
            f"the unhealthy update {inst.image.describe()} was not rolled back: no reboot "
            f"within {wait:.0f}s of its boot (health check shortened to {count} checks "
            f"{timeout}s apart)\n{exc}") from None
    inst.boots.append(nxt)
    if host_os.is_reference_os:
        ready = host_os.ready_line(rec.end, nxt.start)
        check(ready is not None and ready[0] == inst.image.version,
              "the unhealthy update must boot (the health check, not the bootloader, rolls "
              f"it back); its console showed {ready}")
    _assert_boot(nxt, inst.old.number, BootState(inst.old.number, 0, 0),
                 "the boot after rollback-health")
    dut.wait_ready()
    assert_back_on_old(host_os, inst, "rollback-health-triggered")
