"""Each suite fails when the OS breaks its promise, and says which promise.

A child pytest runs the suite on a QEMU board with the reference OS, with the promise broken
at runtime on the device by ``tests/ntp/break_os.py`` (``HIL_BREAK``). The rig is a copy of
``qemu-aarch64`` under a name of its own, so this does not queue behind other sessions' use of
that rig; the NTP server still takes the host-wide lock on :123.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hil.cache import runtime_dir
from hil.lock import lock_dir

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parents[2]


def run_broken(tmp_path: Path, brk: str, args: list[str],
               timeout: float = 840) -> subprocess.CompletedProcess[str]:
    rigs = tmp_path / "rigs"
    rigs.mkdir()
    name = f"neg-{brk}-{os.getpid()}"  # a rig of its own: no queue behind others, no reuse
    shutil.copy(REPO / "rigs" / "qemu-aarch64.yaml", rigs / f"{name}.yaml")
    # (the default runtime directory: QEMU's socket paths under tmp_path get too long)
    env = {**os.environ, "HIL_BREAK": brk, "COLUMNS": "400"}  # untruncated summary
    env.pop("HIL_RIG", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p",
             "tests.ntp.break_os", f"--rigs-dir={rigs}", f"--rig={name}", "-rfs", "-v", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        (lock_dir() / f"{name}.lock").unlink(missing_ok=True)
        shutil.rmtree(runtime_dir("rigs", name), ignore_errors=True)


def failed_lines(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if line.startswith("FAILED"))


def test_ntp_suite_fails_when_chrony_drops_the_configured_server(tmp_path: Path) -> None:
    run = run_broken(tmp_path, "chrony-no-servers",
                     ["suites/ntp", "-k", "synchronises_to_the_rig"])
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-6000:]
    assert "1 failed" in out, out[-6000:]
    assert ("chrony on the device has the NTP server that config.json's ntpServers names "
            "(10.0.2.2) among its sources: not so after") in failed_lines(out), out[-6000:]


def test_ntp_suite_fails_when_chrony_does_not_step_the_clock(tmp_path: Path) -> None:
    run = run_broken(tmp_path, "chrony-no-makestep",
                     ["suites/ntp", "-k", "synchronises_to_the_rig or steps_back"])
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-6000:]
    assert "1 failed, 1 passed" in out, out[-6000:]  # it still synchronises: only the step fails
    assert ("after its clock was set 300s wrong, the device steps back to the NTP server's "
            "time: not so after") in failed_lines(out), out[-6000:]


def test_devices_suite_fails_naming_a_missing_node(tmp_path: Path) -> None:
    run = run_broken(tmp_path, "no-gpiochip0", ["suites/devices"])
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-6000:]
    failed = failed_lines(out)
    assert ("test_dev_node_exists_and_opens[/dev/gpiochip0] - AssertionError: /dev/gpiochip0 "
            "is missing: device type generic-aarch64 promises it") in failed, out[-6000:]
    assert ("test_gpio_chip_has_its_lines[gpiochip0] - AssertionError: GPIO chip "
            "/dev/gpiochip0 is missing") in failed, out[-6000:]
    # the other nodes still pass: the failure is about the broken promise only
    assert "test_dev_node_exists_and_opens[/dev/rtc0] PASSED" in out
