"""Where built and prepared artefacts are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$HIL_CACHE_DIR`` (default ``~/.cache/pytest-hil``) joined with ``parts``, created."""
    root = Path(os.environ.get("HIL_CACHE_DIR") or Path.home() / ".cache" / "pytest-hil")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_dir(*parts: str) -> Path:
    """Per-process scratch (sockets, pid files): ``$HIL_RUNTIME_DIR`` or /tmp/hil-<uid>."""
    root = Path(os.environ.get("HIL_RUNTIME_DIR") or f"/tmp/hil-{os.getuid()}")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
