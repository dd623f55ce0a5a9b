"""A TCP port forward (socat): how a bench host makes a board's SSH port reachable from the lab
while a lease is live. ``close()`` kills socat's process group, the child it forked for each
connection included, so a session whose lease ended loses its SSH connection as it loses its
console."""

from __future__ import annotations

import shutil
from pathlib import Path

from hil.deadline import wait_until
from hil.emu.procs import Daemon, tcp_listening
from hil.errors import InfraError

CONNECT_TIMEOUT = 5  # seconds to reach the board's port behind the forward


class Forward:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], runtime: Path, *,
                 rig: str, part: str = "network") -> None:
        self.listen, self.target, self.runtime, self.rig, self.part = (listen, target, runtime,
                                                                       rig, part)
        self.daemon: Daemon | None = None

    def start(self) -> Forward:
        socat = shutil.which("socat")
        if socat is None:
            raise InfraError("socat is not installed (apt package socat)", part=self.part,
                             rig=self.rig)
        (host, port), (to_host, to_port) = self.listen, self.target
        if tcp_listening(port):
            raise InfraError(f"cannot forward {host}:{port} to {to_host}:{to_port}: the port is "
                             "already in use", part=self.part, rig=self.rig)
        daemon = self.daemon = Daemon(
            "socat", [socat, f"TCP-LISTEN:{port},bind={host},reuseaddr,fork",
                      f"TCP:{to_host}:{to_port},connect-timeout={CONNECT_TIMEOUT}"],
            self.runtime / "forward.log", part=self.part, rig=self.rig).start()

        def listening() -> bool:
            daemon.check()
            return tcp_listening(port, daemon.pid)  # socat, not who took the port

        wait_until(listening, 10, f"socat to listen on {host}:{port}", seen=lambda: "port closed",
                   interval=0.02, part=self.part, rig=self.rig)
        return self

    def close(self) -> None:
        """Stop listening and cut every connection through the forward."""
        if self.daemon is not None:
            self.daemon.stop(grace=0)
            self.daemon = None
