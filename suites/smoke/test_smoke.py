"""The board boots the image and comes back from a reboot and from a power cut."""

from __future__ import annotations

from hil.dut import Dut

LABELS = ("resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data")


def test_runs_the_device_types_architecture(dut: Dut) -> None:
    dtype = dut.rig.config.device_type
    machine = dut.run_check("uname -m").stdout.strip()
    assert machine in dtype.uname_machines, f"device type is {dtype.arch}, the board runs {machine}"


def test_has_the_balena_partitions(dut: Dut) -> None:
    found = dut.run_check("ls /dev/disk/by-label/ 2>/dev/null || blkid -s LABEL -o value"
                          ).stdout.split()
    missing = [label for label in LABELS if label not in found]
    assert not missing, f"partitions labelled {missing} are missing; the board has {found}"


def test_soft_reboot_starts_a_new_boot(dut: Dut) -> None:
    before = dut.boot_id()
    dut.reboot()
    after = dut.boot_id()
    assert after != before, "boot id unchanged: the board did not really reboot"


def test_power_cycle_brings_the_board_back(dut: Dut) -> None:
    before = dut.boot_id()
    dut.power_cycle()
    assert dut.boot_id() != before, "boot id unchanged after a power cut"
    assert dut.run("true").ok
