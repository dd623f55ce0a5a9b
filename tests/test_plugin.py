"""The pytest plugin as a user meets it, run in a child pytest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

pytest_plugins = ["pytester"]

USES_DUT = """
def test_uses_the_board(dut):
    assert dut.run("true").ok
"""


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("HIL_RIG", raising=False)


def test_without_a_rig_tests_that_need_one_are_skipped(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_DUT)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a rig: run with --rig NAME*"])


def test_a_module_that_cannot_be_imported_is_reported_as_pytest_reports_it(
        pytester: pytest.Pytester) -> None:
    # the short summary (-ra) asks the plugin about the collection error's report too
    pytester.makepyfile("from nowhere import nothing\n" + USES_DUT)
    result = pytester.runpytest_subprocess("-ra")
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    result.stdout.fnmatch_lines(["*ModuleNotFoundError: No module named 'nowhere'*",
                                 "ERROR *test_a_module_that_cannot*"])
    assert "Traceback (most recent call last)" not in result.stderr.str()


def test_a_malformed_rig_file_is_a_usage_error_naming_file_line_key(
        pytester: pytest.Pytester) -> None:
    rig = pytester.makefile(".yaml", bench="device_type: generic-aarch64\ntarget:\n"
                                           "  driver: qemu\n  memory: lots\n")
    pytester.makepyfile(USES_DUT)
    result = pytester.runpytest_subprocess(f"--rig={rig}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--rig {rig}: {rig}:4: target.memory: *integer*"])
    assert "Traceback" not in result.stderr.str()


def test_a_rig_fault_is_reported_as_infra_not_as_a_test_failure(
        pytester: pytest.Pytester) -> None:
    rig = pytester.makefile(".yaml", broken="device_type: generic-aarch64\ntarget:\n"
                                            "  driver: qemu\n  firmware: /nonexistent/u-boot.bin\n")
    pytester.makepyfile(USES_DUT + "\n\ndef test_second(dut):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--rig={rig}", "--no-flash", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*rig (infrastructure) errors — not test failures*",
                                 "*test_uses_the_board*/nonexistent/u-boot.bin not found*"])
    assert result.parseoutcomes().get("infra") == 2
    assert "failed" not in result.parseoutcomes()


# A bench board behind a console server (a unix socket): once powered it prints a boot log with
# terminal control codes, stops at the bootloader's prompt, and its console server dies.
BOARD = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
sock.listen(1)
conn, _ = sock.accept()
with open(sys.argv[2]) as power:  # the rig's power-on command writes to this FIFO
    power.read()
lines = ["", "U-Boot 2023.01 (Jan 01 2023 - 00:00:00 +0000)", "DRAM:  512 MiB",
         "\x1b[1mBoot menu\x1b[0m", "\x1b[7m  1. boot from disk\x1b[0m\x1b[6n\x1b[?25l"]
lines += [f"scanning bus {i} for devices... no disk" for i in range(30)]
conn.sendall(("\r\n".join(lines) + "\r\n=> ").encode())
conn.close()
"""


@pytest.fixture
def dying_console(pytester: pytest.Pytester) -> Iterator[Path]:
    """A rig file whose console server dies at the bootloader's prompt (no QEMU)."""
    sock, fifo = pytester.path / "con.sock", pytester.path / "power.fifo"
    os.mkfifo(fifo)
    board = subprocess.Popen([sys.executable, "-c", BOARD, str(sock), str(fifo)])
    rig = pytester.makefile(".yaml", cheap=f"""
        device_type: generic-aarch64
        power_off_time: 0
        power: {{driver: command, on: "echo on > {fifo}", off: "true"}}
        console: {{driver: serial, url: "unix://{sock}"}}
    """)
    try:
        yield rig
    finally:
        board.kill()
        board.wait(timeout=10)


def test_a_rig_fault_shows_its_error_console_and_summary_line(
        pytester: pytest.Pytester, dying_console: Path, tmp_path: Path) -> None:
    pytester.makepyfile(USES_DUT)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(f"--rig={dying_console}", "--no-flash", "-ra",
                                           f"--junitxml={junit}",
                                           f"--alluredir={pytester.path / 'allure'}")
    assert result.parseoutcomes().get("infra") == 1
    out = result.stdout.str()
    # the whole error as a failure's section shows it, with the console tail up to the prompt
    result.stdout.fnmatch_lines([
        "*INFRA: rig (infrastructure) errors — not test failures*",
        "*INFRA test_uses_the_board (at setup)*",
        "*InfraError: [[]rig cheap console[]] gave up waiting for shell prompt after *: the "
        "console connection dropped during the wait (unix://*",
        "*--- console tail ---",
        "*scanning bus 29 for devices... no disk",
        "*=>",
        "*- Captured console -*",
        "U-Boot 2023.01 *",
        "DRAM:  512 MiB",
        "Boot menu",
        "  1. boot from disk",
        "scanning bus 0 for devices... no disk",
    ])
    # the rig's timeline: the error's first line and the console's last line, not a cut
    result.stdout.fnmatch_lines(["*ERR wait for shell — [[]rig cheap console[]] gave up waiting "
                                 "for shell prompt after * (console's last line: '=>')"])
    # pytest's short summary names INFRA, the rig and the part
    result.stdout.fnmatch_lines(["*short test summary info*",
                                 "INFRA test_*::test_uses_the_board (at setup) - rig cheap, "
                                 "console: gave up waiting for shell prompt after *"])
    # control codes are gone from what people read, kept in the capture file
    assert "\x1b" not in out and "[6n" not in out and "[0m" not in out
    error = ElementTree.parse(junit).find(".//error")
    assert error is not None and error.text and re.search(r"no disk\nE +=>\n", error.text)
    assert "#x1B" not in junit.read_text()
    attachments = [p.read_text() for p in (pytester.path / "allure").glob("*-attachment.txt")]
    assert any("Boot menu\n" in a for a in attachments), attachments
    assert not any("\x1b" in a for a in attachments)
    console_log = tmp_path / "run" / "rigs" / "cheap" / "console.log"
    assert b"\x1b[1mBoot menu\x1b[0m" in console_log.read_bytes()
    assert b"\x1b[6n" in console_log.read_bytes()


def test_needs_marker_skips_when_the_rig_lacks_the_feature(pytester: pytest.Pytester) -> None:
    rig = pytester.makefile(".yaml", plain="device_type: generic-aarch64\n"
                                           "target: {driver: qemu}\n")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.needs("gpio_loopback")
        def test_loopback():
            raise AssertionError("must not run")

        @pytest.mark.needs("rtc")
        def test_rtc_feature_from_device_type():
            pass
    """)
    result = pytester.runpytest_subprocess(f"--rig={rig}", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*rig plain lacks gpio_loopback*"])
