"""A child pytest on a QEMU board with the reference OS, on a copy of ``qemu-aarch64`` under a
name of its own (no queueing behind other sessions, nothing left behind): how tests/broken runs
suites against a broken OS and tests/e2e/test_report.py a session whose reports it reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hil.cache import runtime_dir
from hil.lock import lock_dir

REPO = Path(__file__).resolve().parents[1]


def run_on_own_rig(tmp_path: Path, args: list[str], *, env: dict[str, str] | None = None,
                   boot_timeout: int = 0, timeout: float = 840,
                   target: dict[str, object] | None = None) -> tuple[int, str]:
    """(exit code, whole output) of ``pytest ARGS`` on the rig's copy. ``boot_timeout``: a
    short boot deadline; ``target``: settings of the QEMU board that differ from the rig's."""
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("no qemu-system-aarch64")
    rigs = tmp_path / "rigs"
    rigs.mkdir(parents=True)
    name = f"neg-{os.getpid()}-{tmp_path.name}"[:60]  # a rig of its own: no queue, no reuse
    rig = yaml.safe_load((REPO / "rigs" / "qemu-aarch64.yaml").read_text())
    if boot_timeout:
        rig["timeouts"] = {"boot": boot_timeout}
    rig["target"].update(target or {})
    (rigs / f"{name}.yaml").write_text(yaml.safe_dump(rig))
    # (the default runtime directory: QEMU's socket paths under tmp_path get too long)
    child_env = {**os.environ, "COLUMNS": "400", **(env or {})}  # untruncated summary
    child_env.pop("HIL_RIG", None)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rigs-dir={rigs}",
             f"--rig={name}", "-rfE", "-v", *args],
            cwd=REPO, env=child_env, capture_output=True, text=True, timeout=timeout)
    finally:
        (lock_dir() / f"{name}.lock").unlink(missing_ok=True)
        shutil.rmtree(runtime_dir("rigs", name), ignore_errors=True)
    return run.returncode, run.stdout + run.stderr
