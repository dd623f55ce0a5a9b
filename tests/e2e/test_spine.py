"""The spine end to end, on real QEMU boards: what a user sees when things go right and wrong.
Each runs a child pytest the way a user would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil.lock import RigLock
from hil.qemu import board_processes

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parents[2]


def qemu_pids(runtime: Path) -> list[int]:
    """QEMU boards (and their disks' nbdkit) still running from this test's runtime directory."""
    return [pid for pid, _ in board_processes(runtime)]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(HIL_LOCK_DIR=str(tmp_path / "locks"), HIL_RUNTIME_DIR=str(tmp_path / "run"))
    e.pop("HIL_RIG", None)
    return e


def pytest_child(args: list[str], env: dict[str, str], cwd: Path,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def rig_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text("device_type: generic-aarch64\npower_off_time: 0\n" + body)
    return path


def test_smoke_suite_passes_on_the_qemu_rig(tmp_path: Path, env: dict[str, str]) -> None:
    """What a user's session prints, and that it leaves no QEMU behind. Two smoke tests with
    no reboot are enough for that: the whole smoke suite runs on both QEMU boards in
    `make test`'s other stream."""
    run = pytest_child(["--rig=qemu-aarch64", "suites/smoke", "-v", "-k",
                        "architecture or partitions"], env, REPO)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "2 passed, 3 deselected" in run.stdout, run.stdout[-3000:]
    assert not qemu_pids(tmp_path), "a QEMU board outlived its session"
    # the summary splits the wall time: boots and commands were waited on, the rest is ours
    split = re.search(r"time: ([\d.]+)s on the rig; waiting on the device ([\d.]+)s \(\d+%: "
                      r"(.*?)\); rig hardware ([\d.]+)s \((.*?)\); framework and test code "
                      r"([\d.]+)s", run.stdout)
    assert split, run.stdout[-3000:]
    wall, device, waits, hardware, _, rest = split.groups()
    assert "boot" in waits and "command" in waits, waits
    assert abs(float(wall) - float(device) - float(hardware) - float(rest)) < 0.3
    # and by suite: the session start (flash, first boot), then the suite's tests
    rows = dict(re.findall(r"^  (session start|smoke) +([\d.]+)s  device", run.stdout, re.M))
    assert set(rows) == {"session start", "smoke"}, run.stdout[-3000:]
    assert abs(sum(map(float, rows.values())) - float(wall)) < 1.0, run.stdout[-3000:]


def test_qemu_that_fails_to_start_is_one_clear_rig_error(tmp_path: Path,
                                                          env: dict[str, str]) -> None:
    rig = rig_file(tmp_path, "badqemu", "target:\n  driver: qemu\n"
                                        "  extra_args: [-no-such-option]\n")
    (tmp_path / "test_x.py").write_text("def test_boot(dut):\n    pass\n")
    t0 = time.monotonic()
    run = pytest_child([f"--rig={rig}", "--no-flash", "test_x.py"], env, tmp_path, timeout=60)
    assert time.monotonic() - t0 < 30
    assert run.returncode == 1
    assert "1 infra" in run.stdout
    assert "QEMU exited with 1 at start" in run.stdout
    assert "no-such-option" in run.stdout  # QEMU's own words are in the message
    assert not qemu_pids(tmp_path)


def test_guest_that_never_reaches_a_shell_fails_within_its_deadline(
        tmp_path: Path, env: dict[str, str]) -> None:
    # A blank disk: U-Boot finds nothing to boot and sits at its own prompt.
    rig = rig_file(tmp_path, "blank", "timeouts: {boot: 20}\ntarget:\n  driver: qemu\n"
                                      "  disk_size: 67108864\n")
    (tmp_path / "test_x.py").write_text("def test_boot(dut):\n    pass\n")
    t0 = time.monotonic()
    run = pytest_child([f"--rig={rig}", "--no-flash", "test_x.py"], env, tmp_path, timeout=120)
    took = time.monotonic() - t0
    assert run.returncode == 1, run.stdout[-3000:]
    assert took < 60, f"deadline was 20 s, took {took:.0f} s"
    expected = r"timed out after (19|20)\.\ds waiting for (a shell prompt or login|the shell)"
    assert re.search(expected, run.stdout), run.stdout[-3000:]
    assert "saw: '=> '" in run.stdout  # what the board did last: U-Boot sits at its prompt
    assert not qemu_pids(tmp_path)


def _sigint_default() -> None:
    # Python ignores SIGINT if it was ignored at its start (as for a background job of a
    # non-interactive shell, which may be how these tests run): a bench user's Ctrl-C is not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_the_board_off_and_the_rig_free(tmp_path: Path, env: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "test_long.py").write_text(
        "import time\n\ndef test_long(dut):\n    print('RUNNING', flush=True)\n"
        "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s",
                             f"--rigs-dir={REPO / 'rigs'}", "--rig=qemu-aarch64",
                             "test_long.py"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_sigint_default)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if "RUNNING" in line or time.monotonic() > deadline:
            break
    assert any("RUNNING" in s for s in seen), "".join(seen[-40:])
    assert qemu_pids(tmp_path), "the board should be on while the test runs"
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # pytest's faulthandler prints every thread's stack
        rest, _ = proc.communicate(timeout=30)
        pytest.fail("the session did not end within 60 s of Ctrl-C:\n" + "".join(seen) + rest)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, "".join(seen) + rest
    assert not qemu_pids(tmp_path), "Ctrl-C left the board powered"
    monkeypatch.setenv("HIL_LOCK_DIR", env["HIL_LOCK_DIR"])  # the child's lock directory
    lock = RigLock("qemu-aarch64")
    lock.acquire(0)
    lock.release()


def test_second_session_on_a_held_rig_names_the_holder(tmp_path: Path,
                                                        env: dict[str, str]) -> None:
    old = os.environ.get("HIL_LOCK_DIR")
    os.environ["HIL_LOCK_DIR"] = env["HIL_LOCK_DIR"]  # the child's lock directory
    lock = RigLock("qemu-aarch64")
    try:
        lock.acquire(0, "someone else's run")
        (tmp_path / "test_x.py").write_text("def test_boot(dut):\n    pass\n")
        run = pytest_child([f"--rigs-dir={REPO / 'rigs'}", "--rig=qemu-aarch64", "--rig-wait=0",
                            "test_x.py"], env, tmp_path, timeout=60)
        assert run.returncode == 1
        assert f"rig is in use by pid {os.getpid()}" in run.stdout
        assert "someone else's run" in run.stdout
        assert not qemu_pids(tmp_path)
    finally:
        lock.release()
        if old is None:
            os.environ.pop("HIL_LOCK_DIR", None)
        else:
            os.environ["HIL_LOCK_DIR"] = old
