"""SD mux drivers: USB-SD-Mux and SDWire at their API/CLI boundary (the real usbsdmux package
is also driven against a non-mux device), the virtual mux for real with loop devices and udev
events."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hil.errors import InfraError
from hil.mux.sdwire import SdWire, SdWireSettings
from hil.mux.usbsdmux import UsbSdMux, UsbSdMuxSettings
from hil.mux.virtual import VirtualMux, VirtualMuxSettings, loops_backing
from hil.registry import PartContext
from hil.udev import wait_for_block

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def mctx(tmp_path: Path) -> PartContext:
    return PartContext(rig="bench1", part="sd_mux", runtime=tmp_path, device_type=None)


def tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# --- USB-SD-Mux ----------------------------------------------------------------------------------

class FakeMuxCtl:
    def __init__(self) -> None:
        self.mode = "off"
        self.stuck = False
        self.hang = False

    def _go(self, mode: str) -> None:
        if self.hang:
            threading.Event().wait(30)
        if not self.stuck:
            self.mode = mode

    def mode_host(self) -> None:
        self._go("host")

    def mode_DUT(self) -> None:
        self._go("dut")

    def mode_disconnect(self) -> None:
        self._go("off")

    def get_mode(self) -> str:
        return self.mode


def test_usbsdmux_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      mctx: PartContext) -> None:
    import usbsdmux.usbsdmux as api

    sg = tmp_path / "id-000000000042"  # stands for the udev link to /dev/sgN
    sg.touch()
    ctl = FakeMuxCtl()
    opened: list[str] = []
    def autoselect_driver(sg: str) -> FakeMuxCtl:
        opened.append(sg)
        return ctl

    monkeypatch.setattr(api, "autoselect_driver", autoselect_driver)
    mux = UsbSdMux(UsbSdMuxSettings(sg=str(sg), timeout=0.5), mctx)
    mux.to_host()
    assert ctl.mode == "host" and mux.state() == "host"
    mux.to_dut()
    assert mux.state() == "dut"
    mux.off()
    assert mux.state() == "off" and opened[0] == str(sg)
    ctl.stuck = True
    with pytest.raises(InfraError, match="reads 'off' after switching to 'host'"):
        mux.to_host()
    ctl.stuck, ctl.hang = False, True
    t0 = time.monotonic()
    with pytest.raises(InfraError, match=r"no answer within 0\.5s"):
        mux.to_dut()
    assert time.monotonic() - t0 < 1.5


def test_usbsdmux_api_on_something_else(mctx: PartContext) -> None:
    mux = UsbSdMux(UsbSdMuxSettings(sg="/dev/null"), mctx)
    with pytest.raises(InfraError) as err:
        mux.to_host()
    assert "rig bench1 sd_mux" in str(err.value) and "is it a USB-SD-Mux" in str(err.value)


def test_usbsdmux_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      mctx: PartContext) -> None:
    state = tmp_path / "mux-state"
    state.write_text("off")
    tool(tmp_path / "bin", "usbsdmux", f"""
[ "$1" = --json ] || exit 9
case "$3" in
  get) printf '{{"switch-state": "%s"}}\\n' "$(cat {state})" ;;
  host|dut|off) echo "$3" > {state}; echo '{{}}' ;;
esac
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr("hil.mux.usbsdmux.find_tool", lambda name: name)  # not the venv's
    (tmp_path / "sg3").touch()
    mux = UsbSdMux(UsbSdMuxSettings(sg=str(tmp_path / "sg3"), interface="cli"), mctx)
    mux.to_host()
    assert state.read_text().strip() == "host" and mux.state() == "host"
    mux.to_dut()
    assert mux.state() == "dut"


def test_usbsdmux_unplugged(mctx: PartContext) -> None:
    mux = UsbSdMux(UsbSdMuxSettings(sg="/dev/usb-sd-mux/id-000000000042"), mctx)
    with pytest.raises(InfraError, match="not found"):
        mux.to_host()


def test_usbsdmux_real_cli_error(mctx: PartContext) -> None:
    mux = UsbSdMux(UsbSdMuxSettings(sg="/dev/null", interface="cli"), mctx)
    with pytest.raises(InfraError, match=r"(?s)exit status 1.*really point to a USB-SD-Mux"):
        mux.state()


# --- SDWire ------------------------------------------------------------------------------------

def test_sd_mux_ctrl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mctx: PartContext) -> None:
    state, calls = tmp_path / "state", tmp_path / "calls"
    state.write_text("DUT")
    tool(tmp_path / "bin", "sd-mux-ctrl", f"""
echo "$@" >> {calls}
for a in "$@"; do case "$a" in
  --ts) echo TS > {state} ;;
  --dut) echo DUT > {state} ;;
  -u) echo "SD connected to: $(cat {state})" ;;
esac; done
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    mux = SdWire(SdWireSettings(serial="sd-wire_11"), mctx)
    assert mux.tool() == "sd-mux-ctrl" and mux.state() == "dut"
    mux.to_host()
    assert mux.state() == "host"
    mux.off()  # no off position: nothing changes
    assert mux.state() == "host"
    mux.to_dut()
    assert "-e sd-wire_11 --ts" in calls.read_text()


def test_sdwire_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mctx: PartContext) -> None:
    calls = tmp_path / "calls"
    tool(tmp_path / "bin", "sdwire", f'echo "$@" >> {calls}\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    mux = SdWire(SdWireSettings(tool="sdwire", serial="bdgrd_sdwirec_522"), mctx)
    mux.to_host()
    mux.to_dut()
    mux.off()
    assert calls.read_text().splitlines() == [
        "switch -s bdgrd_sdwirec_522 host", "switch -s bdgrd_sdwirec_522 target",
        "switch -s bdgrd_sdwirec_522 off"]
    assert mux.state() is None


def test_sdwire_missing_tool(monkeypatch: pytest.MonkeyPatch, mctx: PartContext) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InfraError, match="no SDWire tool found"):
        SdWire(SdWireSettings(), mctx).to_host()


# --- the virtual mux ----------------------------------------------------------------------------

@pytest.mark.skipif(not IS_ROOT, reason="loop devices need root")
def test_virtual_mux_block_device_appears_by_udev_event(mctx: PartContext) -> None:
    mux = VirtualMux(VirtualMuxSettings(image=Path("bench1-sdcard.img"), size=8 * 2**20), mctx)
    match = {"ATTR{loop/backing_file}": "*/bench1-sdcard.img"}
    try:
        t0 = time.monotonic()
        mux.to_host()
        dev = wait_for_block(None, match, 5, rig="bench1")
        took = time.monotonic() - t0
        assert dev == mux.host_device() and mux.state() == "host"
        with dev.open("r+b") as f:  # the flasher writes through the block device
            f.write(b"HIL-FLASHED")
        mux.to_dut()
        assert loops_backing(mux.image) == [] and mux.state() == "dut"
        assert mux.image.read_bytes()[:11] == b"HIL-FLASHED"  # synced before detaching
        assert mux.position_file.read_text().strip() == "dut"
        print(f"to_host + udev wait: {took * 1000:.0f} ms")
    finally:
        mux.off()


@pytest.mark.skipif(not IS_ROOT, reason="loop devices need root")
def test_virtual_mux_card_held_open_on_the_host(mctx: PartContext) -> None:
    mux = VirtualMux(VirtualMuxSettings(image=Path("held.img"), size=2**20, timeout=0.5), mctx)
    mux.to_host()
    dev = mux.host_device()
    assert dev is not None
    fd = os.open(dev, os.O_RDONLY)
    try:
        with pytest.raises(InfraError, match="still attached to the host"):
            mux.to_dut()
    finally:
        os.close(fd)
        mux.off()
    assert loops_backing(mux.image) == []


def test_virtual_mux_file_side(mctx: PartContext) -> None:
    mux = VirtualMux(VirtualMuxSettings(host_side="file", size=2**20), mctx)
    mux.to_host()
    assert mux.image.stat().st_size == 2**20 and mux.host_device() is None
    assert mux.state() == "host"
    mux.to_dut()
    assert mux.state() == "dut"


def test_block_device_that_never_appears() -> None:
    t0 = time.monotonic()
    with pytest.raises(InfraError) as err:
        wait_for_block(None, {"ATTR{loop/backing_file}": "*/never-there.img"}, 0.5,
                       rig="bench1")
    assert time.monotonic() - t0 < 1.5
    text = str(err.value)
    assert "[rig bench1 storage]" in text and "did not appear within 0.5s" in text
    assert "block devices present" in text


def test_by_id_path_without_udevd() -> None:
    from hil.udev import udevd_running

    with pytest.raises(InfraError) as err:
        wait_for_block(Path("/dev/disk/by-id/usb-LinuxAut_sdmux_HS-SD_MMC_000000000042-0:0"),
                       None, 0.2, rig="bench1")
    if not udevd_running():
        assert "udevd is not running" in str(err.value)


def test_existing_device_is_found_at_once() -> None:
    vda = Path("/dev/vda")
    if not vda.exists():
        pytest.skip("no /dev/vda")
    assert wait_for_block(vda, None, 0.1, rig="bench1") == vda
    found: Any = wait_for_block(None, {"DEVNAME": "/dev/vda"}, 0.1, rig="bench1")
    assert found == vda
