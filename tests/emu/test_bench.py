"""The whole emulated bench, driven by the bench drivers: relay (serial protocol on a pty) →
board power → boot → console (ser2net, rfc2217://) → SD mux (loop device, udev) → flash."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

import hil.emu
from hil.console.serial import SerialConsole
from hil.deadline import wait_until
from hil.emu import ctl
from hil.emu.bench import Bench
from hil.errors import InfraError
from hil.qemu.target import free_port
from tests.emu.helpers import RigMaker, part

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")]

RELAY_RIG = """
device_type: generic-aarch64
power: {{driver: serial-relay, port: relay-tty, channel: 2, status: query}}
console: {{driver: serial, url: "rfc2217://127.0.0.1:{console_port}?ign_set_control"}}
sd_mux: {{driver: virtual, image: vbench-sdcard.img, size: 16777216}}
storage: {{driver: block, match: {{"ATTR{{loop/backing_file}}": "*/vbench-sdcard.img"}}}}
emulator:
  board: {{kernel: {kernel}, initrd: {initrd}, append: "console=ttyAMA0 panic=1"}}
  relay: {{channels: 4}}
  console: {{}}
"""


def wait_text(console: SerialConsole, pattern: str, start: int, timeout: float = 30) -> Any:
    return console.log.wait_for(re.compile(pattern.encode()), start, timeout, pattern)


def test_relay_mux_console_chain(make_rig: RigMaker, tmp_path: Path) -> None:
    rig = make_rig(RELAY_RIG.replace("{console_port}", str(free_port())))
    runtime = tmp_path / "run"
    timings: dict[str, float] = {}
    with Bench(rig, runtime) as bench:
        power: Any = part(rig, "power", runtime)
        mux: Any = part(rig, "sd_mux", runtime)
        storage: Any = part(rig, "storage", runtime)
        console: Any = part(rig, "console", runtime)
        try:
            # flash: power off → mux to host → block device by udev → write → mux to DUT
            power.off()
            t0 = time.monotonic()
            mux.to_host()
            dev = storage.target(5)
            timings["mux to host + udev"] = time.monotonic() - t0
            with open(dev, "r+b") as f:
                f.write(b"HIL-FLASHED-1")
            t0 = time.monotonic()
            mux.to_dut()
            timings["mux to dut"] = time.monotonic() - t0
            # console first, so the first byte of the boot is captured
            console.attach(timeout=5)
            start = console.log.end
            t0 = time.monotonic()
            power.on()
            timings["relay on (read back)"] = time.monotonic() - t0
            assert power.is_on() is True and bench.board.running
            wait_text(console, r"Booting Linux on physical CPU", start)
            wait_text(console, r"HIL-MINI disk: HIL-FLASHED-1", start)
            timings["power on → OS up"] = time.monotonic() - t0
            start = console.log.end
            t0 = time.monotonic()
            console.write(b"uname -m\n")
            wait_text(console, r"aarch64", start, 10)
            timings["command round trip"] = time.monotonic() - t0
            # power cut: QEMU goes, the adapter's tty (and our connection) stays
            t0 = time.monotonic()
            power.off()
            timings["relay off"] = time.monotonic() - t0
            assert not bench.board.running and power.is_on() is False
            assert console.attached
            # card on the host side at power-on: the board boots without it
            mux.to_host()
            start = console.log.end
            power.on()
            wait_text(console, r"HIL-MINI disk: none", start)
            assert bench.board.power_ons == 2
            power.off()
            mux.to_dut()
        finally:
            console.close()
            power.close()
    assert not bench.board.running
    for what, took in timings.items():
        print(f"{what}: {took * 1000:.0f} ms")


def test_relay_that_does_not_answer_leaves_board_off(make_rig: RigMaker, tmp_path: Path) -> None:
    rig = make_rig(RELAY_RIG.replace("{console_port}", str(free_port())))
    runtime = tmp_path / "run"
    with Bench(rig, runtime) as bench:
        assert bench.relay is not None
        power: Any = part(rig, "power", runtime)
        # through the control socket, as a test in another process mutes it
        assert ctl.request(runtime / "emu.sock", ["relay", "mute"]) == "ok"
        assert bench.relay.mute
        t0 = time.monotonic()
        with pytest.raises(InfraError, match=r"\[rig vbench power\].*did not answer"):
            power.on()
        assert time.monotonic() - t0 < 4  # status: query, timeout 3 s
        assert not bench.board.running
        power.close()


PDU_RIG = """
device_type: generic-aarch64
power: {{driver: pdudaemon, url: "http://127.0.0.1:{pdu_port}", hostname: bench-pdu, port: 2}}
console: {{driver: serial, url: "rfc2217://127.0.0.1:{console_port}?ign_set_control"}}
emulator:
  board: {{kernel: {kernel}, initrd: {initrd}, append: "{append}"}}
  pdu: {{}}
  console: {{}}
"""


def test_power_through_real_pdudaemon(make_rig: RigMaker, tmp_path: Path) -> None:
    rig = make_rig(PDU_RIG.replace("{pdu_port}", str(free_port()))
                   .replace("{console_port}", str(free_port())))
    runtime = tmp_path / "run"
    with hil.emu.start(rig, runtime):
        power: Any = part(rig, "power", runtime)
        console: Any = part(rig, "console", runtime)
        try:
            console.attach(timeout=5)
            start = console.log.end
            t0 = time.monotonic()
            power.on()
            on_took = time.monotonic() - t0
            wait_text(console, r"HIL-MINI disk: ", start)
            assert power.is_on() is None
            t0 = time.monotonic()
            power.off()
            off_took = time.monotonic() - t0
            print(f"pdudaemon on: {on_took * 1000:.0f} ms, off: {off_took * 1000:.0f} ms")
        finally:
            console.close()
    assert not (runtime / "emu.sock").exists()


CONSOLE_RIG = """
device_type: generic-aarch64
power: {{driver: serial-relay, port: relay-tty}}
console: {{driver: serial, url: "rfc2217://127.0.0.1:{console_port}?ign_set_control"}}
emulator:
  board: {{kernel: {kernel}, initrd: {initrd}, append: "{append}"}}
  relay: {{status: none}}
  console: {{}}
"""


# pyserial's RFC 2217 reader thread dies noisily when ser2net refuses the second client
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_console_busy_and_vanishing(make_rig: RigMaker, tmp_path: Path) -> None:
    rig = make_rig(CONSOLE_RIG.replace("{console_port}", str(free_port())))
    runtime = tmp_path / "run"
    with Bench(rig, runtime) as bench:
        power: Any = part(rig, "power", runtime)
        first: Any = part(rig, "console", runtime)
        second: Any = part(rig, "console", runtime)
        try:
            first.attach(timeout=5)
            start = first.log.end
            power.on()
            wait_text(first, r"HIL-MINI disk: ", start)
            # someone else's session holds the console: refused within the deadline
            t0 = time.monotonic()
            with pytest.raises(InfraError, match=r"\[rig vbench console\] cannot open"):
                second.attach(timeout=2)
            # its 2 s deadline, not a hang (the margin is for a loaded host)
            assert time.monotonic() - t0 < 15
            # the adapter is unplugged mid-test: waiting on the console fails at once
            bench.board.uart.port.unplug()
            wait_until(lambda: first.log.down, 5, "the console to be reported down")
            t0 = time.monotonic()
            with pytest.raises(InfraError, match=r"\[rig vbench console\] console lost"):
                wait_text(first, r"never printed", first.log.end, 30)
            # once it has not come back within reconnect (5 s), not at the wait's 30 s deadline
            assert time.monotonic() - t0 < 15
        finally:
            power.off()
            first.close()
            second.close()
        assert not bench.board.running
