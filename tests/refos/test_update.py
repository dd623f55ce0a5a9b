"""Host OS updates of the reference OS in QEMU: a good update commits, a root that cannot
boot rolls back through the bootloader counter, an unhealthy root through the health check,
and /data survives all of it. The bootloader state is read from the disk file after every
HIL-BOOT line, so the counter is asserted at each boot."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from refos_guest import Boot, Guest, Images

from hil.deadline import wait_until
from hil.os.balena import break_update_command, shorten_health_check_command
from hil.refos import boot_env, configure

pytestmark = pytest.mark.qemu

GuestFactory = Callable[..., Guest]
# boot to the health check's verdict: the engine's start and its container run under TCG
ENGINE_CHECK = 300.0
MARKERS = ("rollback-health-breadcrumb", "rollback-altboot-breadcrumb",
           "rollback-health-triggered", "rollback-altboot-triggered", "rollback-health-failed")


def env_of(boot: Boot) -> dict[str, str]:
    return {"resin_root_part": str(boot.resin_root_part),
            "upgrade_available": str(boot.upgrade_available), "bootcount": str(boot.bootcount)}


def markers(g: Guest) -> set[str]:
    out = g.run("cd /mnt/state && ls -1 rollback-* 2>/dev/null || true")
    return {m for m in out.split() if m in MARKERS}


def start_v1(guest_factory: GuestFactory, disk: Path, update: Path) -> Guest:
    """Boot the v1 disk with ``update`` attached as /dev/vdb; leave a checksummed file in /data."""
    configure(disk, {"uuid": secrets.token_hex(16), "developmentMode": True})
    g = guest_factory(disk, [update])
    g.start()
    assert g.wait_boot() == Boot(2, 2, 0, 0)
    assert g.wait_ready()[0] == "1.0.0"
    g.wait_prompt()
    g.run("dd if=/dev/urandom of=/data/blob bs=1k count=512 2>/dev/null"
          " && cd /data && md5sum blob > blob.md5 && cd / && sync")
    return g


def install(g: Guest, new_version: str) -> None:
    out = g.run("hostapp-update -f /dev/vdb", timeout=180)
    assert new_version in out
    assert g.run("hil-bootenv").split() == ["resin_root_part=3", "upgrade_available=1",
                                            "bootcount=0"]
    assert markers(g) == {"rollback-health-breadcrumb", "rollback-altboot-breadcrumb"}
    assert g.run("blkid -s LABEL -o value /dev/vda3") == "resin-rootB"
    # as balenaOS's hostapp-update: the VPN's state for the health check (the OS has no VPN)
    assert g.run("cat /mnt/state/rollback-health-variables") == "BALENAOS_ROLLBACK_VPNONLINE=0"


def assert_data_intact(g: Guest) -> None:
    assert g.run("cd /data && md5sum -c blob.md5") == "blob: OK"


def test_good_update_commits(images: Images, disk: Path, guest_factory: GuestFactory) -> None:
    g = start_v1(guest_factory, disk, images.v2.rootfs)
    install(g, "2.0.0")
    g.run(shorten_health_check_command(count=15, timeout=5))  # its first wait only
    g.reboot()

    boot = g.wait_boot()
    assert boot == Boot(3, 3, 1, 1)
    assert boot_env(disk) == env_of(boot)
    assert g.wait_ready()[0] == "2.0.0"
    g.wait_prompt()
    # rollback-health waits for the engine, sees a healthy OS (engine included) and commits,
    # then says so on the console: awaited there with no command in flight, so that the line
    # does not land in a command's output
    g.expect(r"HIL: rollback-health: healthy, update to 2\.0\.0 committed", ENGINE_CHECK)
    g.wait_prompt()
    assert g.run("hil-bootenv").split() == ["resin_root_part=3", "upgrade_available=0",
                                            "bootcount=0"]
    assert markers(g) == set()
    assert g.run("findmnt -no SOURCE /mnt/sysroot/active") == "/dev/vda3"
    assert 'VERSION="2.0.0"' in g.run("cat /etc/os-release")
    assert g.run("readlink -f /dev/disk/by-state/active") == "/dev/vda3"
    assert_data_intact(g)

    # committed: the next boot stays on the new root and does not count
    g.reboot()
    assert g.wait_boot() == Boot(3, 3, 0, 0)
    assert g.wait_ready()[0] == "2.0.0"
    g.wait_prompt()
    assert_data_intact(g)


def test_broken_init_rolls_back_through_bootcount(images: Images, disk: Path,
                                                   guest_factory: GuestFactory) -> None:
    g = start_v1(guest_factory, disk, images.v2.rootfs)
    install(g, "2.0.0")
    g.run(break_update_command("init", reference_os=True))  # as balenaOS's tests break it
    g.reboot()

    # the new root panics at init; each reset counts, the 4th boot (bootcount 4 > 3) falls back
    for count in (1, 2, 3):
        boot = g.wait_boot()
        assert boot == Boot(3, 3, count, 1)
        assert boot_env(disk) == env_of(boot)
        g.expect(r"Kernel panic", 60)
    boot = g.wait_boot()
    assert boot == Boot(2, 3, 4, 1)
    assert boot_env(disk) == env_of(boot)
    # the old OS's rollback-altboot points the bootloader back at itself and reboots
    g.expect(r"rollback-altboot: rebooting", 60)
    boot = g.wait_boot()
    assert boot == Boot(2, 2, 0, 0)
    assert g.wait_ready()[0] == "1.0.0"
    g.wait_prompt()
    assert markers(g) == {"rollback-altboot-triggered"}
    assert g.run("hil-bootenv").split() == ["resin_root_part=2", "upgrade_available=0",
                                            "bootcount=0"]
    assert g.run("findmnt -no SOURCE /mnt/sysroot/active") == "/dev/vda2"
    assert_data_intact(g)


def test_broken_health_rolls_back_through_health_check(images: Images, disk: Path,
                                                       guest_factory: GuestFactory) -> None:
    g = start_v1(guest_factory, disk, images.v2.rootfs)
    install(g, "2.0.0")
    g.run(break_update_command("health", reference_os=True))
    g.run(shorten_health_check_command(count=2, timeout=1))  # the new root's copy, as balenaOS's
    g.reboot()

    boot = g.wait_boot()
    assert boot == Boot(3, 3, 1, 1)
    assert g.wait_ready()[0] == "2.0.0"
    g.expect(r"rollback-health: unhealthy after 2 checks", ENGINE_CHECK)
    boot = g.wait_boot()
    assert boot == Boot(2, 2, 0, 0)
    assert boot_env(disk) == env_of(boot)
    assert g.wait_ready()[0] == "1.0.0"
    g.wait_prompt()
    assert markers(g) == {"rollback-health-triggered"}
    assert g.run("findmnt -no SOURCE /mnt/sysroot/active") == "/dev/vda2"
    assert 'VERSION="1.0.0"' in g.run("cat /etc/os-release")
    assert g.run("cat /mnt/state/rollback-health-variables") == "BALENAOS_ROLLBACK_VPNONLINE=0"
    assert_data_intact(g)


def test_power_cut_during_update_boots_old_root(images: Images, disk: Path,
                                                guest_factory: GuestFactory) -> None:
    g = start_v1(guest_factory, disk, images.v2.rootfs)
    g.run("hostapp-update -f /dev/vdb > /tmp/hup.log 2>&1 &")
    wait_until(lambda: g.run("pidof dd >/dev/null && echo busy || echo idle") == "busy", 30,
               "dd writing the inactive root", interval=0.05)
    g.kill()  # power cut in the middle of writing resin-rootB
    assert boot_env(disk) == {"resin_root_part": "2", "upgrade_available": "0",
                              "bootcount": "0"}
    g.start()
    assert g.wait_boot() == Boot(2, 2, 0, 0)
    assert g.wait_ready()[0] == "1.0.0"
    g.wait_prompt()
    assert_data_intact(g)
    # and the interrupted update can simply be run again
    install(g, "2.0.0")
