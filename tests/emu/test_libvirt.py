"""The libvirt target: a real libvirtd (started here per platform.md §2), a TCG domain booting
the mini OS, the console captured from the first byte."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.deadline import wait_until
from hil.emu import libvirtd
from hil.qemu.libvirt import LibvirtSettings, LibvirtTarget
from hil.registry import PartContext
from tests.emu.minios import MiniOs

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def libvirt_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("libvirt")
    try:
        cm = libvirtd.running(tmp_path_factory.mktemp("libvirtd"))
        uri = cm.__enter__()
    except Exception as exc:  # no root, no libvirt packages
        pytest.skip(f"cannot run libvirtd here: {exc}")
    yield uri
    cm.__exit__(None, None, None)


def test_domain_xml_pins_tcg(tmp_path: Path) -> None:
    ctx = PartContext(rig="lv", part="target", runtime=tmp_path, device_type=None)
    xml = LibvirtTarget(LibvirtSettings(arch="x86_64"), ctx).domain_xml()
    assert "<domain type='qemu'" in xml and "<acpi/>" in xml
    xml = LibvirtTarget(LibvirtSettings(), ctx).domain_xml()
    assert "<acpi/>" not in xml and "bootdelay0.bin</loader>" in xml  # the lab's bootdelay
    assert "<tcg><tb-cache unit='MiB'>256</tb-cache></tcg>" in xml


def test_libvirt_target_boots_and_cuts_power(libvirt_uri: str, mini_os: MiniOs,
                                             tmp_path: Path) -> None:
    ctx = PartContext(rig="lv", part="target", runtime=tmp_path, device_type=None)
    target = LibvirtTarget(LibvirtSettings(uri=libvirt_uri, kernel=mini_os.kernel,
                                           initrd=mini_os.initrd, append="console=ttyAMA0",
                                           disk_size=16 * 2**20), ctx)
    parts: Any = target.parts()
    power, console, storage = parts["power"], parts["console"], parts["storage"]
    try:
        with open(storage.target(1), "r+b") as f:
            f.write(b"LIBVIRT-DISK")
        t0 = time.monotonic()
        power.on()
        took_on = time.monotonic() - t0
        assert power.is_on() is True
        # the kernel's very first line: nothing was lost between start and attach
        console.log.wait_for(re.compile(rb"Booting Linux on physical CPU"), 0, 30, "boot")
        console.log.wait_for(re.compile(rb"HIL-MINI disk: LIBVIRT-DISK"), 0, 30, "the disk")
        took_up = time.monotonic() - t0
        start = console.log.end
        console.write(b"uname -m\n")
        console.log.wait_for(re.compile(rb"aarch64"), start, 10, "uname")
        t0 = time.monotonic()
        power.off()
        took_off = time.monotonic() - t0
        assert power.is_on() is False and target.status() == "off"
        # the guest powering itself off stops the domain (on_poweroff destroy)
        power.on()
        start = console.log.end
        console.log.wait_for(re.compile(rb"mini# "), start, 30, "the shell")
        console.write(b"poweroff -f\n")
        wait_until(lambda: not target.running, 15, "the domain to stop after poweroff")
        print(f"libvirt create→resume: {took_on * 1000:.0f} ms, up: {took_up * 1000:.0f} ms, "
              f"destroy: {took_off * 1000:.0f} ms")
    finally:
        target.close()
    assert not target.running
