"""Getting an update image onto the device, fast.

Measured on qemu-aarch64 (TCG, 2 loaded host cores), 128 MiB reference OS rootfs into
``hostapp-update``: SSH stdin 125 s (dropbear's cipher under emulation is the bottleneck),
HTTP + gzip 29-35 s (gunzip under emulation is slower than the network), HTTP raw 14-23 s,
HTTP raw of the same filesystem shrunk to its content (``resize2fs -M``, 56 MiB) 6-8 s. So:
the rig host serves the image over plain HTTP on the rig's network and the device pulls it;
a rootfs is shrunk first (same files, no free space to copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hil.errors import InfraError

log = logging.getLogger(__name__)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/sbin:/usr/sbin")
    if path is None:
        raise InfraError(f"{name} is not installed on the rig host (package e2fsprogs)",
                         part="update")
    return path


HEADROOM = 4 << 20  # bytes of free space left in a shrunk root filesystem


def shrink_rootfs(src: Path, workdir: Path) -> Path:
    """A copy of the ext4 image ``src`` shrunk to its content plus ``HEADROOM``, cached in
    ``workdir`` by the source's identity. ``hostapp-update`` writes it into the inactive root
    partition; the filesystem then simply does not use the partition's tail. The headroom is
    for the edits balenaOS's tests make in a new root before booting it (``sed -i`` writes a
    new file)."""
    st = src.stat()
    ident = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
                           ).hexdigest()[:16]
    out = workdir / f"{src.stem}-{ident}-min.img"
    if out.exists():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    subprocess.run(["cp", "--sparse=always", str(src), str(tmp)], check=True, timeout=300)
    fsck = subprocess.run([_tool("e2fsck"), "-f", "-y", str(tmp)], capture_output=True,
                          text=True, timeout=300, check=False)
    if fsck.returncode > 1:  # 1: fixed something (a fresh image has nothing to fix)
        raise InfraError(f"update image {src} fails e2fsck: {fsck.stdout[-500:]}",
                         part="update")
    full, _ = _block_count(tmp)
    _resize2fs(tmp, ["-M"], src)
    blocks, block_size = _block_count(tmp)
    # never larger than the source: -M's estimate for a nearly full filesystem can exceed it,
    # and the source is what fits the root partition
    _resize2fs(tmp, [str(min(blocks + HEADROOM // block_size, full))], src)
    tmp.rename(out)
    for old in workdir.glob(f"{src.stem}-*-min.img"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _resize2fs(image: Path, args: list[str], src: Path) -> None:
    # resize2fs takes the options before the image and a new size after it
    argv = [_tool("resize2fs"), *args, str(image)] if args[0].startswith("-") else \
        [_tool("resize2fs"), str(image), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise InfraError(f"resize2fs {' '.join(args)} {src}: {proc.stderr[-500:]}",
                         part="update")


def _block_count(image: Path) -> tuple[int, int]:
    """(block count, block size) of an ext4 image, from its superblock."""
    with image.open("rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    blocks_lo, = struct.unpack_from("<I", sb, 4)
    blocks_hi, = struct.unpack_from("<I", sb, 0x150)
    log_size, = struct.unpack_from("<I", sb, 24)
    feature_incompat, = struct.unpack_from("<I", sb, 0x60)
    high = blocks_hi if feature_incompat & 0x80 else 0  # INCOMPAT_64BIT
    return blocks_lo | (high << 32), 1024 << log_size


def rootfs_version(image: Path) -> str | None:
    """VERSION from /etc/os-release inside an ext4 root filesystem image (debugfs, no mount)."""
    from hil.os.parse import os_release

    debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/sbin:/usr/sbin")
    if debugfs is None:
        return None
    proc = subprocess.run([debugfs, "-R", "cat /etc/os-release", str(image)],
                          capture_output=True, text=True, timeout=60, check=False)
    release = os_release(proc.stdout)
    return release.get("VERSION") or release.get("VERSION_ID")


class FileServer:
    """Serves files over HTTP at unguessable paths, for the device to download.

    Bound to the address the device reaches the rig host at (``network.host_address``) if that
    is one of the host's addresses; otherwise to loopback, which is what QEMU user networking
    forwards the guest's 10.0.2.2 to."""

    def __init__(self, host_address: str) -> None:
        self.host_address = host_address
        self._files: dict[str, Path] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("update file server: %s", self.requestline)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                with server._lock:
                    path = server._files.get(self.path)
                if path is None:
                    self.send_error(404)
                    return
                size = path.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if not body:
                    return
                with path.open("rb") as f, contextlib.suppress(ConnectionError):
                    shutil.copyfileobj(f, self.wfile, 1 << 20)

        try:
            self._httpd = ThreadingHTTPServer((host_address, 0), Handler)
        except OSError:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="hil-update-server", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @contextlib.contextmanager
    def serving(self, path: Path) -> Iterator[str]:
        """The URL of ``path`` for the device, valid inside the ``with``."""
        token = f"/{secrets.token_hex(8)}/{path.name}"
        with self._lock:
            self._files[token] = path
        try:
            yield f"http://{self.host_address}:{self.port}{token}"
        finally:
            with self._lock:
                self._files.pop(token, None)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
