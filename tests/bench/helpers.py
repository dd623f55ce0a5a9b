"""Running ``hil`` bench commands as a person at a terminal would: child processes, a pty for
the console."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect

from hil.lock import RigLock

# a process holding a rig's lock as a pytest session's does (the same RigLock)
HOLD = """
import sys, time
from hil.lock import RigLock
RigLock(sys.argv[1]).acquire(0, sys.argv[2])
print("held", flush=True)
time.sleep(120)
"""


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HIL_LOCK_DIR=str(root / "locks"), HIL_RUNTIME_DIR=str(root / "run"))
    env.pop("HIL_RIG", None)
    return env


def hil(env: dict[str, str], *args: str, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    run = hil(env, *args, timeout=timeout)
    assert run.returncode == 0, f"hil {' '.join(args)}: {run.returncode}\n{run}"
    return run.stdout


def hold(env: dict[str, str], rig: str, what: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, rig, what], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def lock_is_free(env: dict[str, str], rig: str) -> bool:
    lock = RigLock(rig)
    lock.path = Path(env["HIL_LOCK_DIR"]) / f"{rig}.lock"
    return lock.free()


def console_session(env: dict[str, str], rig: str) -> str:
    """``hil console RIG`` on a pty: a command typed, its answer seen, a prompt, the exit key;
    returns the log path it names."""
    con = pexpect.spawn(sys.executable, ["-m", "hil.cli", "console", rig], env=env, timeout=30)
    try:
        con.expect(r"console open \(Ctrl-\] exits\)")
        con.sendline("echo bench-$((6*7))")
        con.expect("bench-42")  # computed by the board's shell, not our echo
        con.sendline("")
        con.expect("# ")  # a person's prompt: the framework's shell has none
        con.send("\x1d")
        con.expect(r"console closed; its log: (\S+)")
        log = con.match.group(1).decode()
        con.expect(pexpect.EOF)
    finally:
        con.close(force=True)
    assert con.exitstatus == 0, con.before
    return log


def interrupt_boot(env: dict[str, str], rig: str) -> subprocess.CompletedProcess[str]:
    """``hil boot RIG --no-flash``, Ctrl-C once it waits for the boot."""
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "boot", rig, "--no-flash"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    out = ""
    while "wait for the boot" not in out:
        line = proc.stdout.readline()
        assert line, out
        out += line
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out + rest, "")
