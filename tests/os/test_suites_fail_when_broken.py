"""The provisioning, persistence and rollback suites fail when the OS breaks its promise, and
say which promise.

A child pytest runs the suite on a QEMU board with the reference OS while
``tests/os/break_os.py`` breaks promises on the running device (``HIL_OS_BREAK``). The rig is a
copy of ``qemu-aarch64`` under a name of its own (no queueing behind other sessions) with a
60 s boot deadline, so a missing reboot is reported in a minute, not three.
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


def run_broken(tmp_path: Path, breaks: str, args: list[str],
               timeout: float = 840) -> tuple[int, str, str]:
    """(exit code, whole output, the FAILED summary lines) of the suites run broken."""
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("no qemu-system-aarch64")
    rigs = tmp_path / "rigs"
    rigs.mkdir()
    name = f"neg-os-{os.getpid()}-{len(list(tmp_path.parent.iterdir()))}"
    text = (REPO / "rigs" / "qemu-aarch64.yaml").read_text()
    (rigs / f"{name}.yaml").write_text(text + "timeouts: {boot: 60}\n")
    env = {**os.environ, "HIL_OS_BREAK": breaks, "COLUMNS": "400"}  # untruncated summary
    env.pop("HIL_RIG", None)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.os.break_os",
             f"--rigs-dir={rigs}", f"--rig={name}", "-rfE", "-v", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        (lock_dir() / f"{name}.lock").unlink(missing_ok=True)
        shutil.rmtree(runtime_dir("rigs", name), ignore_errors=True)
    out = run.stdout + run.stderr
    failed = "\n".join(ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR")))
    return run.returncode, out, failed


def test_persistence_suite_fails_when_data_is_not_persisted(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "data-not-persisted", [
        "suites/persistence", "--power-cuts=1", "-k",
        "data_lives or soft_reboot or random_power_cuts"])
    assert code == 1 and "3 failed" in out, out[-6000:]
    assert ("test_data_lives_on_the_data_partition - AssertionError: /data is on tmpfs (tmpfs), "
            "not on the resin-data partition") in failed, out[-6000:]
    assert ("test_file_survives_a_soft_reboot - AssertionError: a file and its checksum in "
            "/data did not survive a soft reboot") in failed, out[-6000:]
    assert "was acknowledged (fsync returned) before the power cut, but only records 1..0 " \
           "survived" in failed, out[-6000:]


def test_provisioning_suite_fails_on_a_leaked_key_and_a_wrong_hostname(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "console-leaks-key,hostname-ignored", [
        "suites/provisioning", "-k", "hostname_is_config or no_key_in"])
    assert code == 1 and "2 failed" in out, out[-6000:]
    assert ("test_hostname_is_config_hostname_or_uuid_prefix - AssertionError: /etc/hostname "
            "is 'balena'; the first 7 characters of uuid is") in failed, out[-6000:]
    assert ("test_no_key_in_the_console_log_or_the_report - AssertionError: provisioning key "
            "(apiKey) appeared on the console") in failed, out[-6000:]


def test_rollback_suite_fails_when_rollbacks_are_disabled(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "no-altboot-rollback,no-health-rollback", [
        "suites/rollback", "-k", "unbootable or unhealthy"])
    assert code == 1 and "2 failed" in out, out[-6000:]
    assert ("test_unbootable_update_falls_back_through_the_bootloader_counter - AssertionError: "
            "the old OS came up after the fallback boot without running rollback-altboot"
            ) in failed, out[-6000:]
    assert ("test_unhealthy_update_falls_back_through_the_health_check - AssertionError: the "
            "unhealthy update rootfs rootfs.img (VERSION 2.0.0-broken-health) [broken: health] "
            "was not rolled back") in failed, out[-6000:]
