"""The rig lock: exclusive, names its holder, and dies with its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.lock import RigLock

HOLD = """
import sys, time
from hil.lock import RigLock
RigLock(sys.argv[1]).acquire(0, "holder test")
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path))
    return tmp_path


def hold(rig: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, rig], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_session_fails_at_once_naming_the_holder() -> None:
    proc = hold("bench1")
    try:
        with pytest.raises(InfraError) as err:
            RigLock("bench1").acquire(0)
        assert f"pid {proc.pid}" in str(err.value)
        assert "holder test" in str(err.value)
        assert "rig bench1" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_killed_holder_frees_the_rig() -> None:
    proc = hold("bench2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = RigLock("bench2")
    lock.acquire(0)
    assert lock.held
    lock.release()


def test_waiting_session_gets_the_rig_when_released() -> None:
    proc = hold("bench3")
    messages: list[str] = []
    try:
        import threading

        threading.Timer(0.5, proc.kill).start()
        lock = RigLock("bench3")
        lock.acquire(20, on_wait=messages.append)
        assert lock.held
        assert messages and "in use by pid" in messages[0]
        lock.release()
    finally:
        proc.kill()
        proc.wait()
