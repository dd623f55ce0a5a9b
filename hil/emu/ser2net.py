"""ser2net (4.x, the Debian package) exporting a tty as RFC 2217 on TCP, as bench hosts export
their USB-serial adapters. Clients use ``rfc2217://HOST:PORT?ign_set_control`` (a pty cannot
set DTR/RTS, platform.md §5).

A second client is refused while one is connected (no ``kickolduser``): a busy console is an
error for the second user, not a silent theft of the first one's console.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hil.deadline import wait_until
from hil.emu.procs import Daemon, tcp_listening
from hil.errors import InfraError


class Ser2Net:
    def __init__(self, runtime: Path, tty: Path, port: int, *, host: str = "127.0.0.1",
                 baud: int = 115200, rig: str = "", part: str = "emulator") -> None:
        self.runtime, self.tty, self.port, self.host, self.baud = runtime, tty, port, host, baud
        self.rig, self.part = rig, part
        self.daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"rfc2217://{self.host}:{self.port}?ign_set_control"

    def config(self) -> str:
        return "\n".join([
            "%YAML 1.1",
            "---",
            "connection: &console",
            f"  accepter: telnet(rfc2217),tcp,{self.host},{self.port}",
            f"  connector: serialdev,{self.tty},{self.baud}n81,local",
            "  options:",
            "    kickolduser: false",
            "    mdns: false",  # else: "Unable to start mdns: Out of memory"
            "",
        ])

    def start(self) -> Ser2Net:
        binary = shutil.which("ser2net") or "/usr/sbin/ser2net"
        if not Path(binary).exists():
            raise InfraError("ser2net is not installed (apt package ser2net)", part=self.part,
                             rig=self.rig)
        if tcp_listening(self.port):
            raise InfraError(f"cannot start ser2net: {self.host}:{self.port} is already in "
                             f"use", part=self.part, rig=self.rig)
        conf = self.runtime / "ser2net.yaml"
        conf.write_text(self.config())
        # -d: foreground with its log on stdout; -u: no UUCP lock files (the emulator owns the
        # tty, and a killed run must not leave a stale lock behind)
        self.daemon = Daemon("ser2net", [binary, "-d", "-u", "-c", str(conf),
                                         "-P", str(self.runtime / "ser2net.pid")],
                             self.runtime / "ser2net.log", part=self.part, rig=self.rig).start()
        daemon = self.daemon

        def listening() -> bool:
            daemon.check()
            return tcp_listening(self.port, daemon.pid)  # ser2net, not who took the port

        wait_until(listening, 10, f"ser2net to listen on {self.host}:{self.port}",
                   seen=lambda: "port closed", interval=0.02, part="ser2net", rig=self.rig)
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
