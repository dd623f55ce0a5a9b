"""`hil emu start` for a person trying the tool: the real virtual-rpi3 rig file, U-Boot on the
board, and every child process gone after Ctrl-C."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil.config import load_rig
from hil.console.serial import SerialConsole, SerialSettings
from hil.power.serial_relay import SerialRelay, SerialRelaySettings
from hil.qemu.target import free_port
from hil.registry import PartContext

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")]

REPO = Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


def test_emu_start_runs_uboot_board_and_cleans_up(tmp_path: Path) -> None:
    console_port = free_port()
    rig_file = tmp_path / "virtual-rpi3.yaml"
    text = (REPO / "rigs" / "virtual-rpi3.yaml").read_text()
    rig_file.write_text(text.replace("7301", str(console_port))
                        .replace("22301", str(free_port())))
    rig = load_rig(str(rig_file))
    runtime = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "emu", "start", str(rig_file),
                             "--runtime", str(runtime)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        out = ""
        deadline = time.monotonic() + 20
        while "Ctrl-C stops it" not in out and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                out += os.read(proc.stdout.fileno(), 4096).decode()
            assert proc.poll() is None, out
        assert f"rfc2217://127.0.0.1:{console_port}" in out
        ctx = PartContext(rig=rig.name, part="power", runtime=runtime, device_type=rig.device_type)
        relay = SerialRelay(rig.parts["power"].settings, ctx)  # type: ignore[arg-type]
        console = SerialConsole(SerialSettings(url=f"rfc2217://127.0.0.1:{console_port}"
                                               "?ign_set_control"), ctx)
        try:
            console.attach(timeout=5)
            relay.on()  # a blank card: U-Boot comes up and finds nothing to boot
            console.log.wait_for(re.compile(rb"U-Boot 20\d\d"), 0, 20, "the U-Boot banner")
            relay.off()
        finally:
            relay.close()
            console.close()
        assert processes_mentioning(str(runtime))  # ser2net with its config in there
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert processes_mentioning(str(runtime)) == []
    finally:
        if proc.poll() is None:  # a failed assertion must not leave the bench running
            proc.terminate()
            proc.wait(timeout=15)
    assert not (runtime / "relay-tty").exists() and not (runtime / "emulator.pid").exists()


def test_relay_rig_file_settings_are_the_bench_drivers() -> None:
    rig = load_rig(str(REPO / "rigs" / "virtual-rpi3.yaml"))
    assert isinstance(rig.parts["power"].settings, SerialRelaySettings)
    assert rig.parts["power"].settings.status == "query"
