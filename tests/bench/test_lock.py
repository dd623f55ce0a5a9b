"""``hil lock`` / ``hil unlock`` and the rig lock the bench commands share with pytest sessions.
No board is powered here: holding the rig builds its parts and touches no switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.lock import RigLock
from tests.bench.helpers import environment, hil, hold, lock_is_free, ok


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return environment(tmp_path)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def holder_pid(env: dict[str, str], rig: str) -> int:
    lock = RigLock(rig)
    lock.path = Path(env["HIL_LOCK_DIR"]) / f"{rig}.lock"
    return int(lock.info()["pid"])


def test_lock_persists_across_commands_until_unlock(env: dict[str, str]) -> None:
    out = ok(env, "lock", "qemu-aarch64")
    assert "locked by you" in out
    pid = holder_pid(env, "qemu-aarch64")
    try:
        assert not lock_is_free(env, "qemu-aarch64")  # held after the command ended
        assert "already locked by you" in ok(env, "lock", "qemu-aarch64")
        # the owner's own commands work on the rig they hold
        assert "power off" in ok(env, "power", "qemu-aarch64", "status")
        # a pytest session is told who holds it
        lock = RigLock("qemu-aarch64")
        lock.path = Path(env["HIL_LOCK_DIR"]) / "qemu-aarch64.lock"
        with pytest.raises(Exception, match=rf"pid {pid} of .* \(hil lock\)"):
            lock.acquire(0)
    finally:
        out = ok(env, "unlock", "qemu-aarch64")
    assert "unlocked" in out
    assert lock_is_free(env, "qemu-aarch64")
    # the holder exits right after its answer
    wait_until(lambda: not alive(pid), 10, f"the holder (pid {pid}) to exit",
               seen=lambda: "still running")
    assert "is not locked" in ok(env, "unlock", "qemu-aarch64")


def test_commands_fail_at_once_naming_a_sessions_holder(env: dict[str, str]) -> None:
    proc = hold(env, "qemu-aarch64", "pytest --rig=qemu-aarch64 suites")
    try:
        for args in (["power", "qemu-aarch64", "status"], ["lock", "qemu-aarch64"],
                     ["unlock", "qemu-aarch64"], ["ssh", "qemu-aarch64", "--", "true"]):
            run = hil(env, *args, timeout=60)
            assert run.returncode in (1, 3), run
            assert f"pid {proc.pid}" in run.stderr, run.stderr
            assert "pytest --rig=qemu-aarch64 suites" in run.stderr, run.stderr
    finally:
        proc.kill()
        proc.wait()


def test_a_board_that_cannot_outlive_the_command_needs_the_lock(env: dict[str, str]) -> None:
    run = hil(env, "power", "qemu-aarch64", "on", timeout=60)
    assert run.returncode == 1
    assert "hil lock qemu-aarch64" in run.stderr, run.stderr
    assert lock_is_free(env, "qemu-aarch64")
