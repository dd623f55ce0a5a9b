"""The board boots the image and comes back from a reboot and from a power cut; where it boots
through U-Boot, its prompt can be reached over the console."""

from __future__ import annotations

import pytest

from hil.console.expect import TIMEOUT
from hil.console.shell import KERNEL_STARTED
from hil.deadline import Deadline
from hil.dut import Dut
from hil.errors import DeadlineError

LABELS = ("resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data")


def test_runs_the_device_types_architecture(dut: Dut) -> None:
    dtype = dut.rig.config.device_type
    machine = dut.run_check("uname -m").stdout.strip()
    assert machine in dtype.uname_machines, f"device type is {dtype.arch}, the board runs {machine}"


def test_has_the_balena_partitions(dut: Dut) -> None:
    # without udev's links, blkid's lines (util-linux's or busybox's: LABEL="..." in each)
    found = dut.run_check("ls /dev/disk/by-label/ 2>/dev/null || "
                          r"""blkid | sed -n 's/.* LABEL="\([^"]*\)".*/\1/p'"""
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


# U-Boot's prompt, and what it prints once it runs its boot command instead
UBOOT_PROMPT = rb"\n=> "
UBOOT_AUTOBOOTS = rb"Found U-Boot script|## Executing script|Starting kernel"
PRESS_EVERY = 0.25  # seconds between presses of Enter while U-Boot comes up


def test_uboot_stops_for_a_key_answers_and_boots_on(dut: Dut) -> None:
    """A bench engineer's way into the bootloader works over the rig's console: Enter pressed
    from U-Boot's banner on stops its autoboot (even a bootdelay of 0 looks at the UART once),
    its prompt runs a command, and ``boot`` boots the OS to a shell."""
    dtype = dut.rig.config.device_type
    if dtype.bootloader != "uboot":
        pytest.skip(f"device type {dtype.slug} boots through {dtype.bootloader}, not U-Boot: "
                    "no U-Boot prompt to interrupt")
    con = dut.console
    dut.power_off()
    dut.rig.power_on()  # not dut.power_on(): that boots on by itself
    con.expect(rb"U-Boot 20\d\d", timeout=dut.timeouts.boot)  # U-Boot runs: keys wait for it
    deadline = Deadline(dut.timeouts.boot)
    while True:
        con.send("\n")
        i = con.expect([UBOOT_PROMPT, UBOOT_AUTOBOOTS, TIMEOUT], timeout=PRESS_EVERY)
        if i == 0:
            break
        assert i == 2, (f"U-Boot booted on ({con.after!r}) although Enter was pressed from its "
                        "banner on: its autoboot did not stop for a key")
        if deadline.expired():
            raise DeadlineError("U-Boot's prompt '=> ' (Enter pressed every "
                                f"{PRESS_EVERY} s from its banner on)",
                                repr(con.before[-200:]), deadline.timeout, tail=con.log.tail())
    con.sendline("printenv bootcmd")
    # the whole line (a chunk may end inside it), not its end: the prompt follows
    i = con.expect([rb"\nbootcmd=([^\r\n]+)(?=\r?\n)", rb"## Error[^\r\n]*"])
    assert i == 0, f"U-Boot has no boot command to boot on: {con.after!r}"
    con.expect(UBOOT_PROMPT)  # back at the prompt: the command ran to its end
    con.sendline("boot")
    # the kernel has the console now: the shell's set-up line is not typed into U-Boot
    con.expect(KERNEL_STARTED, timeout=dut.timeouts.boot)
    dut.wait_ready()
    assert dut.run("true").ok
