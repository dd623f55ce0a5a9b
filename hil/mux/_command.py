"""Running a mux's command-line tool with a deadline (shared by the command-based drivers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hil.errors import InfraError


def find_tool(name: str) -> str:
    """``name`` from the running Python's environment (pip-installed tools), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or name


def run_tool(argv: Sequence[str], timeout: float, *, part: str, rig: str) -> str:
    """stdout of ``argv``; InfraError (with the tool's own message) on failure or timeout."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as exc:
        raise InfraError(f"{argv[0]} cannot run: {exc.strerror}", part=part, rig=rig) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise InfraError(f"{' '.join(argv)} did not finish within {timeout:.1f}s", part=part,
                         rig=rig) from None
    if proc.returncode != 0:
        detail = (err or out).strip()[-500:] or "(no output)"
        raise InfraError(f"{' '.join(argv)} failed with exit status {proc.returncode}: "
                         f"{detail}", part=part, rig=rig)
    return out
