"""The bench commands on the qemu-x86_64 rig, whose board is a QEMU process: held by
``hil lock``, booted once for the module by ``hil boot`` (the reference OS), then driven by
the owner's commands through the holder. The GRUB board: its first boot of a fresh image is
known by the reference OS's boot line alone (its console shows no bootloader banner); the
U-Boot boards' bench commands are the virtual Raspberry Pi's (test_virtual_rpi3.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.qemu import board_processes
from tests.bench.helpers import (
    console_session,
    environment,
    hil,
    interrupt_boot,
    lock_is_free,
    ok,
)

pytestmark = pytest.mark.qemu
RIG = "qemu-x86_64"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("bench-qemu")
    env = environment(root)
    ok(env, "lock", RIG)
    try:
        out = ok(env, "boot", RIG, timeout=900)
        assert "flash " in out and f"rig {RIG} is up" in out, out
        yield env
    finally:
        ok(env, "unlock", RIG)
    assert lock_is_free(env, RIG)
    assert board_processes(root / "run") == [], "a QEMU board outlived hil unlock"


def test_boot_leaves_the_board_up(env: dict[str, str]) -> None:
    assert f"rig {RIG}: power on" in ok(env, "power", RIG, "status")
    assert board_processes(Path(env["HIL_RUNTIME_DIR"]))  # kept by the lock's holder


def test_ssh_runs_a_command_with_its_streams_and_exit_code(env: dict[str, str]) -> None:
    run = hil(env, "ssh", RIG, "--", "uname -m; echo to-stderr >&2; exit 3", timeout=120)
    assert run.returncode == 3, run
    assert run.stdout.strip() == "x86_64"
    assert run.stderr.strip() == "to-stderr"


def test_console_is_interactive_and_captured(env: dict[str, str]) -> None:
    log = console_session(env, RIG)
    assert "bench-42" in Path(log).read_text(errors="replace")  # the capture went on


def test_mux_on_a_rig_without_one_is_a_clear_error(env: dict[str, str]) -> None:
    run = hil(env, "mux", RIG, "status")
    assert run.returncode == 2
    assert f"rig {RIG} has no 'sd_mux:'" in run.stderr and f"{RIG}.yaml" in run.stderr


def test_power_off_on_read_back(env: dict[str, str]) -> None:
    assert f"rig {RIG}: power off" in ok(env, "power", RIG, "off")
    assert f"rig {RIG}: power off" in ok(env, "power", RIG, "status")
    assert not board_processes(Path(env["HIL_RUNTIME_DIR"]))
    assert f"rig {RIG}: power on" in ok(env, "power", RIG, "cycle")
    assert f"rig {RIG}: power on" in ok(env, "power", RIG, "status")


def test_ctrl_c_powers_off_and_keeps_the_lock(env: dict[str, str]) -> None:
    run = interrupt_boot(env, RIG)
    assert run.returncode == 130, run.stdout
    assert f"rig {RIG}: power off" in ok(env, "power", RIG, "status")
    assert not lock_is_free(env, RIG)  # the owner's `hil lock` holds it still
