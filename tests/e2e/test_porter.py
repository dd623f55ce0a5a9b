"""A board porter's own image through `pytest --image=IMG`, as they would run it: an image the
framework did not build for its suites (tests/e2e/porter_image.py: one ext4 partition, no
balena layout, systemd as init with its coloured status lines on the console, root with a
password). It is flashed as it is, the console login types the password the rig file's
variable holds, smoke's OS-neutral tests pass and its partitions test fails naming what the
board has; the report shows the console without colour codes. One session; the password
shows up nowhere."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from hil.qemu import board_processes

from .porter_image import LABEL, build

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parents[2]
RIG = """device_type: generic-aarch64
power_off_time: 0
ssh:
  password_env: PORTER_ROOT_PASSWORD
target:
  driver: qemu
  memory: 512
"""


def test_a_porters_image_boots_as_it_is_and_logs_in_with_the_rigs_password(
        tmp_path: Path) -> None:
    password = secrets.token_urlsafe(12)
    image = build(tmp_path, password)
    rig = tmp_path / "porter.yaml"
    rig.write_text(RIG)
    run_dir = tmp_path / "run"
    env = dict(os.environ, HIL_LOCK_DIR=str(tmp_path / "locks"), HIL_RUNTIME_DIR=str(run_dir),
               PORTER_ROOT_PASSWORD=password)
    env.pop("HIL_RIG", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", f"--rig={rig}",
         f"--image={image}", f"--log-file={tmp_path / 'run.log'}", "--log-file-level=DEBUG",
         f"--hil-report={tmp_path / 'report'}", "suites/smoke"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert "1 failed, 4 passed" in out, out[-6000:]
    for name in ("runs_the_device_types_architecture", "soft_reboot_starts_a_new_boot",
                 "power_cycle_brings_the_board_back", "uboot_stops_for_a_key_answers_and_boots_on"):
        assert re.search(rf"::test_{name} PASSED", out), out[-6000:]
    # the partitions test fails on what the board has, not on the way it looked
    assert re.search(r"::test_has_the_balena_partitions FAILED", out), out[-6000:]
    assert f"are missing; the board has ['{LABEL}']" in out, out[-6000:]
    # said once in the summary (and once in the log): the image was flashed unconfigured
    said = f"image {image} flashed as it is: no resin-boot or balena-boot partition"
    assert out.count(said) == 1, out[-6000:]
    assert said in (tmp_path / "run.log").read_text()
    console_log = run_dir / "rigs" / "porter" / "console.log"
    assert console_log.read_bytes().count(b"Password:") >= 4  # every boot asked for it
    # systemd's coloured status lines came before each login; the report shows them plain
    assert b"\x1b[0;32m  OK  \x1b[0m] Reached target" in console_log.read_bytes()
    [page] = (tmp_path / "report").iterdir()
    html = page.read_text()
    assert "Reached target" in html and "\x1b" not in html, "the report keeps colour codes"
    leaks = [str(p) for p in [*run_dir.rglob("*"), tmp_path / "run.log", page]
             if p.is_file() and p.suffix != ".img" and password.encode() in p.read_bytes()]
    assert password not in out and not leaks, f"the password is in {leaks or 'the output'}"
    assert not list(board_processes(run_dir)), "a QEMU board outlived its session"
