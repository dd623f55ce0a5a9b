"""Run libvirtd (and virtlogd) in the foreground for tests and demos, on hosts without systemd
(platform.md §2). If a libvirtd already answers on the system socket, it is used as it is and
left alone.

Starting one needs root and three host preparations that ``libvirt-daemon-system`` would do:
the log directory, the ``libvirt-qemu`` user that libvirtd resolves before reading qemu.conf,
and a qemu.conf that runs QEMU as root without a security driver (no DAC relabelling of the
disk images we hand it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from hil.deadline import wait_until
from hil.emu.procs import Daemon
from hil.errors import InfraError
from hil.lock import HostLock

log = logging.getLogger(__name__)

SYSTEM_SOCKET = Path("/var/run/libvirt/libvirt-sock")
LOCK_WAIT = 900.0  # another session's libvirtd: a smoke run or a test module
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_TEXT = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
                  'security_driver = "none"\n')


def answering(path: Path = SYSTEM_SOCKET) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def prepare_host() -> None:
    """The one-time host setup a manual libvirtd start needs (root only, idempotent)."""
    if os.geteuid() != 0:
        raise InfraError("starting libvirtd needs root (or use qemu:///session as a user)",
                         part="emulator")
    Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True,
                      check=False).returncode != 0:
        subprocess.run(["groupadd", "-r", "-f", "libvirt-qemu"], check=True)
        subprocess.run(["useradd", "-r", "-M", "-g", "libvirt-qemu", "-s",
                        "/usr/sbin/nologin", "libvirt-qemu"], check=True)
    current = QEMU_CONF.read_text() if QEMU_CONF.exists() else None
    if current != QEMU_CONF_TEXT:
        if current is not None and not QEMU_CONF.with_suffix(".conf.hil-orig").exists():
            shutil.copy2(QEMU_CONF, QEMU_CONF.with_suffix(".conf.hil-orig"))
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(QEMU_CONF_TEXT)


@contextlib.contextmanager
def running(runtime: Path) -> Iterator[str]:
    """A libvirtd answering on ``qemu:///system`` for the duration; yields that URI."""
    uri = "qemu:///system"
    # One we start is ours to stop: other sessions on this host wait rather than use it and see
    # it vanish. A libvirtd already answering with no one holding the lock is the host's own.
    lock = HostLock("libvirtd", "the libvirtd this host's test sessions start", part="emulator")
    lock.acquire(LOCK_WAIT, f"pid {os.getpid()} runs libvirtd", on_wait=log.warning)
    if answering():
        lock.release()
        yield uri
        return
    try:
        with _started(runtime):
            yield uri
    finally:
        lock.release()


@contextlib.contextmanager
def _started(runtime: Path) -> Iterator[None]:
    for tool in ("libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            raise InfraError(f"{tool} is not installed (apt packages libvirt-daemon "
                             f"libvirt-daemon-driver-qemu)", part="emulator")
    prepare_host()
    runtime.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        virtlogd = Daemon("virtlogd", ["virtlogd"], runtime / "virtlogd.log").start()
        stack.callback(virtlogd.stop)
        libvirtd = Daemon("libvirtd", ["libvirtd"], runtime / "libvirtd.log").start()
        stack.callback(libvirtd.stop, 10.0)

        def up() -> bool:
            libvirtd.check()
            return answering()

        wait_until(up, 30, "libvirtd to answer on its socket", seen=lambda: "no answer",
                   part="libvirtd")
        yield
