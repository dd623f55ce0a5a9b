"""Rig faults mid-session, on an emulated bench (a serial relay, ser2net in front of the
board's UART, a virtual SD mux, a QEMU board with the reference OS). For each fault: the
session reports it as INFRA naming the part and the rig, before the wait it broke would have
run out (no hang), the session leaves the board off, and the next session on the rig is green.

The bench runs here, as a lab's hardware runs apart from the sessions; each session is a child
pytest, as a user runs it. The faults are injected through the emulator's control socket
(ser2net, the relay), the host's kernel (an SSH connection's socket killed with ``ss -K``),
a process killed (the NTP server), a file made immutable (the SD card). Three sessions: the
flash refused (no boot), the faults (a flash, a boot), the next session (a flash, a boot)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hil.config import load_rig
from hil.emu.bench import Bench
from hil.qemu.target import free_port

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop devices, ss -K, chattr: root")]
REPO = Path(__file__).resolve().parents[2]
RIG = "faults-rpi3"

# Each fault test writes how long the session took to report the fault; the deadline each
# wait had is far longer, so a report in time is detection, not a timeout.
FAULTS = textwrap.dedent('''
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from hil.deadline import wait_until
    from hil.emu.ctl import request
    from hil.ntp import NtpServer
    from hil.qemu.target import free_port

    sys.path.insert(0, os.path.join(os.environ["HIL_REPO"], "suites", "ntp"))
    from ntp_device import NtpRig  # noqa: E402

    LONG = 120.0  # the deadline of each wait a fault breaks


    def emu(dut, *words):
        assert request(dut.rig.runtime / "emu.sock", words) == "ok", words


    def took(name, since):
        path = os.environ["FAULT_TIMES"]
        times = json.load(open(path)) if os.path.exists(path) else {}
        times[name] = round(time.monotonic() - since, 2)
        json.dump(times, open(path, "w"))


    def test_green(dut):
        assert dut.run_check("echo console").stdout.strip() == "console"
        assert dut.ssh_run("echo ssh").stdout.strip() == "ssh"


    def test_console_comes_back_quickly(dut):
        at = len(dut.rig.log.events)
        emu(dut, "ser2net", "stop")
        wait_until(lambda: dut.rig.log.down, 10, "the console to see ser2net go")
        emu(dut, "ser2net", "start")
        assert dut.run_check("echo back", timeout=LONG).stdout.strip() == "back"
        kinds = [e.kind for e in dut.rig.log.events[at:]]
        assert "console-lost" in kinds and "console-back" in kinds, kinds


    def test_console_gone(dut):
        emu(dut, "ser2net", "stop")
        t0 = time.monotonic()
        try:
            dut.run("true", timeout=LONG)
        finally:
            took("console gone (ser2net stopped)", t0)
            emu(dut, "ser2net", "start")


    def test_ssh_connection_cut(dut):
        host, port = dut.rig.network.ssh_endpoint()
        dut.run_check("rm -f /tmp/hil-cut-me")
        t0 = [0.0]

        def cut():
            wait_until(lambda: dut.run("test -e /tmp/hil-cut-me").ok, 60,
                       "the SSH command to run", interval=0.5)
            t0[0] = time.monotonic()
            subprocess.run(["ss", "-K", "dst", host, "dport", "=", f":{port}"], check=True,
                           capture_output=True)

        cutter = threading.Thread(target=cut)
        cutter.start()
        try:
            dut.ssh_run("touch /tmp/hil-cut-me; sleep 60", timeout=LONG)
        finally:
            cutter.join()
            took("SSH connection cut", t0[0])


    def test_ntp_server_dies(dut):
        port = free_port()  # UDP, on the host's loopback: 10.0.2.2 to the board
        with NtpServer("127.0.0.1", port, offset=197, rig=dut.rig.name) as server:
            source = "/run/chrony/sources.d/hil-faults.sources"
            dut.run_check(f"echo 'server 10.0.2.2 port {port} iburst' > {source} && "
                          "chronyc reload sources")
            try:
                os.kill(server.pid, signal.SIGKILL)
                t0 = time.monotonic()
                try:
                    NtpRig(dut, server, "10.0.2.2").wait_synced("the device follows the server")
                finally:
                    took("NTP server died", t0)
            finally:
                dut.run(f"rm -f {source}; chronyc reload sources")


    def test_relay_stops_answering(dut):
        dut.power_off()
        emu(dut, "relay", "mute")
        t0 = time.monotonic()
        try:
            dut.power_on()
        finally:
            took("relay does not answer (power on)", t0)
            emu(dut, "relay", "unmute")
''')


def child(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def infra_lines(out: str) -> dict[str, str]:
    """The short summary's INFRA lines: test name → "rig R, PART: error"."""
    return dict(re.findall(r"^INFRA \S+::(\w+)(?: \(at \w+\))? - (.*)$", out, re.M))


def test_rig_faults_mid_session_are_infra_and_the_next_session_is_green(
        tmp_path: Path) -> None:
    text = (REPO / "rigs" / "virtual-rpi3.yaml").read_text()
    text = (text.replace("127.0.0.1:7301", f"127.0.0.1:{free_port()}")
            .replace("port: 22301", f"port: {free_port()}")
            .replace("virtual-rpi3-sdcard.img", f"{RIG}-sdcard.img"))
    rig_path = tmp_path / f"{RIG}.yaml"
    rig_path.write_text(text)
    rig = load_rig(str(rig_path))
    run = tmp_path / "run"
    env = dict(os.environ, HIL_LOCK_DIR=str(tmp_path / "locks"), HIL_RUNTIME_DIR=str(run),
               HIL_REPO=str(REPO), FAULT_TIMES=str(tmp_path / "times.json"))
    env.pop("HIL_RIG", None)
    (tmp_path / "test_faults_child.py").write_text(FAULTS)
    (tmp_path / "test_green_child.py").write_text("def test_green(dut):\n"
                                                  "    dut.run_check('true')\n"
                                                  "    dut.ssh_run('true')\n")
    runtime = run / "rigs" / RIG
    with Bench(rig, runtime) as bench:
        card = runtime / f"{RIG}-sdcard.img"
        # the SD card cannot be written: the flash is refused, nothing boots
        with card.open("ab") as f:  # a blank card, as the mux makes one
            f.truncate(rig.parts["sd_mux"].settings.size)  # type: ignore[attr-defined]
        subprocess.run(["chattr", "+i", str(card)], check=True)
        try:
            t0 = time.monotonic()
            s0 = child([f"--rig={rig_path}", "test_green_child.py"], env, tmp_path)
            print(f"flash refused: the session ended after {time.monotonic() - t0:.1f} s")
        finally:
            subprocess.run(["chattr", "-i", str(card)], check=True)
        out0 = s0.stdout + s0.stderr
        assert s0.returncode == 1 and "1 infra" in out0, out0[-5000:]
        flash = infra_lines(out0)
        assert re.match(rf"rig {RIG}, (sd_mux|storage|flash): ", flash.get("test_green", "")), \
            out0[-5000:]
        print(flash["test_green"])
        assert bench.board.power_ons == 0 and not bench.board.running

        # the faults, one session
        s1 = child([f"--rig={rig_path}", "test_faults_child.py"], env, tmp_path)
        out1 = s1.stdout + s1.stderr
        (tmp_path / "faults.log").write_text(out1)
        assert s1.returncode == 1, out1[-8000:]
        assert "2 passed" in out1 and "4 infra" in out1, out1[-8000:]
        parts = {name: at.split(":")[0] for name, at in infra_lines(out1).items()}
        assert parts == {"test_console_gone": f"rig {RIG}, console",
                         "test_ssh_connection_cut": f"rig {RIG}, network",
                         "test_ntp_server_dies": f"rig {RIG}, ntp",
                         "test_relay_stops_answering": f"rig {RIG}, power"}, out1[-8000:]
        assert not bench.board.running, "the session left the board powered"
        times = json.loads((tmp_path / "times.json").read_text())
        for fault, seconds in times.items():
            print(f"{fault}: reported after {seconds:.1f} s")
            assert seconds < 120, f"{fault}: {seconds} s, as long as the wait's deadline"

        # the next session on the rig is green
        s2 = child([f"--rig={rig_path}", "test_green_child.py"], env, tmp_path)
        out2 = s2.stdout + s2.stderr
        assert s2.returncode == 0 and "1 passed" in out2, out2[-5000:]
        assert not bench.board.running
