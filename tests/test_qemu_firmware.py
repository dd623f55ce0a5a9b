"""The rig's U-Boot copy with the lab's autoboot delay."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hil.qemu.firmware import UBOOT_ARM64, default_firmware, uboot_with_bootdelay

ENV = b"\0bootcmd=run distro_bootcmd\0bootdelay=2\0baudrate=115200\0"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path / "cache"))


def test_copy_has_the_delay_and_nothing_else_moves(tmp_path: Path) -> None:
    uboot = tmp_path / "u-boot.bin"
    uboot.write_bytes(b"\x7fcode" * 100 + ENV + b"tail" * 50)
    out = uboot_with_bootdelay(uboot, 0)
    assert out != uboot and out.parent == tmp_path / "cache" / "firmware"
    assert out.read_bytes() == uboot.read_bytes().replace(b"bootdelay=2", b"bootdelay=0")
    assert uboot.read_bytes().count(b"bootdelay=2") == 1  # the original is untouched
    assert uboot_with_bootdelay(uboot, 0) == out  # cached
    assert uboot_with_bootdelay(uboot, 2) == uboot  # already so


@pytest.mark.parametrize("data", [b"no environment here", ENV + ENV, b"\0bootdelay=10\0"])
def test_unpatchable_firmware_is_booted_as_built(tmp_path: Path, data: bytes,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    uboot = tmp_path / "u-boot.bin"
    uboot.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        assert uboot_with_bootdelay(uboot, 0) == uboot
    assert "cannot set its bootdelay to 0" in caplog.text


def test_debian_u_boot_differs_in_one_byte() -> None:
    if not UBOOT_ARM64.is_file():
        pytest.skip("no u-boot-qemu")
    out = default_firmware("aarch64", bootdelay=0)
    assert out is not None and out != UBOOT_ARM64
    a, b = UBOOT_ARM64.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    assert [i for i in range(len(a)) if a[i] != b[i]] == [a.index(b"\0bootdelay=") + 11]
    assert default_firmware("aarch64", bootdelay=None) == UBOOT_ARM64
    assert default_firmware("x86_64", bootdelay=0) is None
