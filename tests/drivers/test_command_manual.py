"""The command and manual power drivers, for real: shell commands, and a pty as the terminal
of the person at the bench."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.power.command import CommandPower, CommandPowerSettings
from hil.power.manual import ManualPower, ManualPowerSettings
from hil.registry import PartContext


def test_command_power_with_status(tmp_path: Path, ctx: PartContext) -> None:
    state = tmp_path / "state"
    p = CommandPower(CommandPowerSettings(
        on=f"echo $HIL_RIG:$HIL_PART > {state}", off=["rm", "-f", str(state)],
        status=["test", "-e", str(state)]), ctx)
    assert p.is_on() is False
    p.on()
    assert state.read_text() == "bench1:power\n" and p.is_on() is True
    p.off()
    assert p.is_on() is False


def test_command_power_status_pattern(ctx: PartContext) -> None:
    p = CommandPower(CommandPowerSettings(on="true", off="true", status="echo 'Port 2: on'",
                                          status_on=r"Port 2: on"), ctx)
    assert p.is_on() is True


def test_failing_command_leaves_power_off(tmp_path: Path, ctx: PartContext) -> None:
    log = tmp_path / "log"
    p = CommandPower(CommandPowerSettings(on="echo nope >&2; exit 3", off=f"echo off >> {log}"),
                     ctx)
    with pytest.raises(InfraError, match="exit status 3: nope"):
        p.on()
    assert log.read_text() == "off\n"


def test_hanging_command_is_killed(tmp_path: Path, ctx: PartContext) -> None:
    p = CommandPower(CommandPowerSettings(on="true", off="sleep 30 & sleep 30", timeout=0.5),
                     ctx)
    t0 = time.monotonic()
    with pytest.raises(InfraError, match=r"did not finish within 0\.5s"):
        p.off()
    assert time.monotonic() - t0 < 2


def test_manual_refuses_in_ci(monkeypatch: pytest.MonkeyPatch, ctx: PartContext) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(InfraError, match="this is CI"):
        ManualPower(ManualPowerSettings(), ctx).on()


def test_manual_refuses_without_terminal(monkeypatch: pytest.MonkeyPatch,
                                         ctx: PartContext) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(InfraError, match="needs a terminal"):
        ManualPower(ManualPowerSettings(tty="/nonexistent/tty"), ctx).on()


def answer_on_pty(master: int, text: bytes, delay: float = 0.2) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        os.write(master, text)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_manual_asks_the_person(monkeypatch: pytest.MonkeyPatch, ctx: PartContext) -> None:
    monkeypatch.delenv("CI", raising=False)
    master, slave = os.openpty()
    p = ManualPower(ManualPowerSettings(tty=os.ttyname(slave), hint="hub port 3", timeout=5),
                    ctx)
    t = answer_on_pty(master, b"\n")
    p.on()
    t.join()
    asked = os.read(master, 4096)
    assert b"[rig bench1] Switch the board's power ON (hub port 3)" in asked
    t = answer_on_pty(master, b"fail\n")
    with pytest.raises(InfraError, match="could not switch the power off"):
        p.off()
    t.join()
    assert p.is_on() is None
    with pytest.raises(InfraError, match="nobody confirmed"):
        ManualPower(ManualPowerSettings(tty=os.ttyname(slave), timeout=0.3), ctx).on()
    os.close(master)
    os.close(slave)
