"""The shipped rig files load, and the emulated ones wire up (without starting anything)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.config import load_rig
from hil.emu.bench import Bench

RIGS = Path(__file__).resolve().parents[2] / "rigs"


@pytest.mark.parametrize("name", ["rpi3", "bbb", "nuc", "virtual-rpi3", "virtual-rpi3-pdu",
                                  "libvirt-aarch64"])
def test_rig_file_loads(name: str, tmp_path: Path) -> None:
    rig = load_rig(str(RIGS / f"{name}.yaml"))
    if rig.emulator:
        bench = Bench(rig, tmp_path)
        assert bench.describe()[0] == f"runtime directory: {tmp_path}"


def test_virtual_rig_wiring(tmp_path: Path) -> None:
    bench = Bench(load_rig(str(RIGS / "virtual-rpi3.yaml")), tmp_path)
    assert bench.relay is not None and bench.relay.link == tmp_path / "relay-tty"
    assert bench.ser2net is not None and bench.ser2net.port == 7301
    assert bench.board.card is not None
    assert bench.board.card[0] == tmp_path / "virtual-rpi3-sdcard.img"
    pdu = Bench(load_rig(str(RIGS / "virtual-rpi3-pdu.yaml")), tmp_path)
    assert pdu.pdu is not None and pdu.pdu.port == 16421 and pdu.pdu_outlet == "1"
    assert "virtual-pdu" in pdu.pdu.pdus
