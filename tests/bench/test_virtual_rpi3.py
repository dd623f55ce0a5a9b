"""The bench commands on the virtual-rpi3 rig: a serial relay, an SD mux, a console behind
ser2net and SSH, emulated by `hil emu start` (as a person tries it). Each command takes the
rig's lock for its duration and drives the bench drivers in its own process; the board, powered
by the relay, stays as the last command left it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.qemu.target import free_port
from tests.bench.helpers import (
    console_session,
    environment,
    hil,
    hold,
    interrupt_boot,
    lock_is_free,
    ok,
)

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """The rig file (with free ports: other runs use the shipped ones), its emulated hardware
    running, and the board booted once by `hil boot`."""
    root = tmp_path_factory.mktemp("bench-vrpi3")
    env = environment(root)
    path = root / "virtual-rpi3.yaml"
    text = (REPO / "rigs" / "virtual-rpi3.yaml").read_text()
    path.write_text(text.replace("7301", str(free_port())).replace("22301", str(free_port())))
    emu = subprocess.Popen([sys.executable, "-m", "hil.cli", "emu", "start", str(path)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert emu.stdout is not None
        out, deadline = b"", time.monotonic() + 30
        while b"Ctrl-C stops it" not in out:
            assert time.monotonic() < deadline and emu.poll() is None, out.decode()
            if select.select([emu.stdout], [], [], 1)[0]:
                out += os.read(emu.stdout.fileno(), 4096)
        boot = ok(env, "boot", str(path), timeout=900)
        assert "rig virtual-rpi3 is up" in boot, boot
        yield str(path), env
    finally:
        emu.send_signal(signal.SIGINT)
        emu.wait(timeout=30)


def test_boot_leaves_the_board_up_and_the_rig_free(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    assert "rig virtual-rpi3: power on" in ok(env, "power", path, "status")  # the relay's word
    assert lock_is_free(env, "virtual-rpi3")


def test_ssh_runs_a_command(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    run = hil(env, "ssh", path, "--", "cat /proc/sys/kernel/hostname; exit 4", timeout=120)
    assert run.returncode == 4, run
    assert run.stdout.strip(), run


def test_console_is_interactive_and_captured(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    log = console_session(env, path)
    assert "bench-42" in Path(log).read_text(errors="replace")
    assert lock_is_free(env, "virtual-rpi3")


def test_mux_to_host_powers_off_first(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    out = ok(env, "mux", path, "host")
    assert "power off first" in out and "rig virtual-rpi3: sd mux host" in out
    assert "rig virtual-rpi3: power off" in ok(env, "power", path, "status")
    assert "rig virtual-rpi3: sd mux host" in ok(env, "mux", path, "status")  # stays switched
    assert "rig virtual-rpi3: sd mux dut" in ok(env, "mux", path, "dut")


def test_power_cycle_read_back(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    assert "rig virtual-rpi3: power on" in ok(env, "power", path, "cycle")
    assert "rig virtual-rpi3: power on" in ok(env, "power", path, "status")


def test_a_session_holding_the_rig_is_named(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    proc = hold(env, "virtual-rpi3", "pytest --rig=virtual-rpi3 suites/smoke")
    try:
        run = hil(env, "power", path, "off", timeout=60)
        assert run.returncode == 3, run
        assert f"pid {proc.pid}" in run.stderr and "suites/smoke" in run.stderr, run.stderr
    finally:
        proc.kill()
        proc.wait()
    assert "rig virtual-rpi3: power on" in ok(env, "power", path, "status")  # untouched


def test_ctrl_c_leaves_the_rig_off_released_and_free(rig: tuple[str, dict[str, str]]) -> None:
    path, env = rig
    run = interrupt_boot(env, path)
    assert run.returncode == 130, run.stdout
    assert "rig virtual-rpi3: power off" in ok(env, "power", path, "status")
    assert "rig virtual-rpi3: sd mux off" in ok(env, "mux", path, "status")
    assert lock_is_free(env, "virtual-rpi3")


def test_boot_without_flashing_gives_the_card_back_to_the_board(
        rig: tuple[str, dict[str, str]]) -> None:
    """A session's end leaves the mux off; the next one that does not flash must switch it to
    the board before power on, or the board has no card to boot."""
    path, env = rig
    ok(env, "mux", path, "host", timeout=60)
    assert "is up" in ok(env, "boot", path, "--no-flash", timeout=300)
    assert "rig virtual-rpi3: sd mux dut" in ok(env, "mux", path, "status")
    ok(env, "power", path, "off", timeout=60)
