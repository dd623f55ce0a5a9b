"""A token the rig host serves over HTTP, for the suites that prove the device reaches the rig
host (its wired interface, the engine's NAT): what comes back must be this token, so no other
server or cached answer can pass for it."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from hil.os.transfer import FileServer


@contextlib.contextmanager
def served_token(host_address: str, directory: Path) -> Iterator[tuple[str, str]]:
    """(token, URL the device fetches it at), served by the rig host inside the ``with``."""
    token = secrets.token_hex(8)
    probe = directory / f"probe-{token}"
    probe.write_text(token + "\n")
    server = FileServer(host_address)
    try:
        with server.serving(probe) as url:
            yield token, url
    finally:
        server.close()
