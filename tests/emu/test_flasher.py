"""The flasher-board boot flow on the emulated Intel NUC (``rigs/virtual-nuc.yaml``): the rig
writes the installer image to the stick in the virtual mux, boots it through pdudaemon power,
waits for the installer to power the board off, takes the stick away and boots the SSD.

The rig file is the shipped one under a name and ports of its own, so these tests neither
queue behind nor collide with a session on ``virtual-nuc``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.cache import runtime_dir
from hil.config import RigConfig, load_rig
from hil.dut import Dut
from hil.errors import DeviceError
from hil.lock import lock_dir
from hil.mux.virtual import loops_backing
from hil.qemu.target import free_port
from hil.session import HilSession, Options

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parents[2]
# block devices that are not disks: the kernel's loop devices (balenaOS's kernels have loop
# too) and device-mapper devices
NOT_DISKS = ("loop", "dm-", "ram", "zram")


def disks(dut: Dut) -> list[str]:
    """The board's disks, as /sys/block names them."""
    return sorted(n for n in dut.run_check("ls /sys/block").stdout.split()
                  if not n.startswith(NOT_DISKS))


@pytest.fixture
def nuc_rig(tmp_path: Path) -> Iterator[Callable[[int], RigConfig]]:
    """Makes the rig, with an SSD of the given size."""
    for tool in ("qemu-system-x86_64", "ser2net", "losetup"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    name = f"flasher-{tmp_path.name[-12:]}".replace("_", "-").lower()

    def make(ssd_size: int) -> RigConfig:
        text = (REPO / "rigs" / "virtual-nuc.yaml").read_text()
        for old in ("16422", "7303", "22303"):
            text = text.replace(old, str(free_port()))
        text = text.replace("size: 2147483648", f"size: {ssd_size}")
        text = text.replace("virtual-nuc-", f"{name}-")
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return load_rig(str(path))

    yield make
    (lock_dir() / f"{name}.lock").unlink(missing_ok=True)
    shutil.rmtree(runtime_dir("rigs", name), ignore_errors=True)


def test_installer_writes_the_ssd_and_the_installed_os_boots_without_the_stick(
        nuc_rig: Callable[[int], RigConfig]) -> None:
    config = nuc_rig(2 * 1024**3)
    session = HilSession(config, Options())
    try:
        dut = session.start("flasher test")
        rig = session.rig
        assert rig is not None
        names = [s.name for s in rig.timeline]
        i = names.index("installer runs")
        assert names[i - 1] == "power on" and names[i + 1] == "power off", names
        assert names[i + 2] == "sd mux → off (installer medium away)", names
        assert names[-2:] == ["power on", "wait for shell"], names
        assert all(s.ok for s in rig.timeline)

        console = rig.log.text()
        installing = console.index("HIL-FLASHER: installing /dev/vda to /dev/vdb")
        powered_down = console.index("reboot: Power down", installing)
        assert "HIL-READY" in console[powered_down:]

        # The board now has one disk, the SSD, and runs the installed copy (no installer marker)
        # configured for this session.
        assert disks(dut) == ["vda"]
        assert not dut.run("test -e /mnt/boot/hil-flasher").ok
        assert dut.os.config_json()["uuid"] == session.device_config["uuid"]
        assert rig.sd_mux is not None and rig.sd_mux.state() == "off"
        stick = runtime_dir("rigs", config.name) / f"{config.name}-stick.img"
        assert not loops_backing(stick), "the stick is still attached to the host"
        ssd = runtime_dir("rigs", config.name) / f"{config.name}-ssd.img"
        with ssd.open("rb") as f:
            f.seek(512)
            assert f.read(8) == b"EFI PART", "no GPT on the SSD"

        # Without the stick every later boot is the SSD's.
        before = dut.boot_id()
        dut.power_cycle()
        assert dut.boot_id() != before
        assert disks(dut) == ["vda"]
        assert "HIL-FLASHER" not in rig.log.text(len(console.encode()))
    finally:
        session.close()
    assert session.rig is not None and session.rig.state == "off"


def test_an_installer_that_fails_is_reported_with_its_reason(
        nuc_rig: Callable[[int], RigConfig]) -> None:
    config = nuc_rig(256 * 1024**2)
    session = HilSession(config, Options())
    with pytest.raises(DeviceError) as err:
        session.start("flasher test")
    message = str(err.value)
    assert "stopped with 'reboot: System halted' instead of powering the board off" in message
    assert re.search(r"HIL-FLASHER: failed: /dev/vdb holds 256 MiB, the image needs \d+ MiB",
                     message), message
    rig = session.rig
    assert rig is not None
    failed = [s for s in rig.timeline if not s.ok]
    assert [s.name for s in failed] == ["installer runs"]
    # start() cleaned up: board off, stick released, rig free
    assert rig.state == "off"
    assert rig.sd_mux is not None and rig.sd_mux.state() == "off"
    assert not session.lock.held
