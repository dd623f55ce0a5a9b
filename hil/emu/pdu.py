"""pdudaemon, run for real, for emulated benches: the rig's ``power: {driver: pdudaemon}``
talks HTTP to it exactly as to a lab's pdudaemon, and its ``localcmdline`` driver runs a
command per switch that reaches the emulated board's power input.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from hil.deadline import wait_until
from hil.emu.procs import Daemon, tcp_listening
from hil.errors import InfraError


def pdudaemon_binary() -> str:
    beside = Path(sys.executable).parent / "pdudaemon"  # the venv we run in
    if beside.exists():
        return str(beside)
    found = shutil.which("pdudaemon")
    if found is None:
        raise InfraError("pdudaemon is not installed (pip install pdudaemon)", part="emulator")
    return found


def ctl_command(sock: Path, *words: str) -> str:
    """A shell command line for pdudaemon's localcmdline: ``%s`` becomes the outlet."""
    quoted = " ".join(shlex.quote(str(w)).replace("%", "%%") for w in
                      (sys.executable, "-m", "hil.emu.ctl", sock, *words))
    return quoted.replace("OUTLET", "%s")


class PduDaemonRunner:
    def __init__(self, runtime: Path, pdus: Mapping[str, Mapping[str, str]], *,
                 host: str = "127.0.0.1", port: int = 16421, rig: str = "",
                 part: str = "emulator") -> None:
        """``pdus``: pdudaemon PDU name → localcmdline settings (cmd_on, cmd_off)."""
        self.runtime, self.host, self.port, self.rig, self.part = runtime, host, port, rig, part
        self.pdus = {name: {"driver": "localcmdline", "retries": 1, **cfg}
                     for name, cfg in pdus.items()}
        self.daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> PduDaemonRunner:
        conf = self.runtime / "pdudaemon.conf"
        conf.write_text(json.dumps({
            "daemon": {"hostname": self.host, "port": self.port, "listener": "http",
                       "logging_level": "DEBUG"},
            "pdus": self.pdus}, indent=2))
        if tcp_listening(self.port):
            raise InfraError(f"cannot start pdudaemon: {self.host}:{self.port} is already "
                             f"in use", part=self.part, rig=self.rig)
        # the ctl commands import hil: make sure they find this checkout
        import hil

        env = {**os.environ, "PYTHONPATH": str(Path(hil.__file__).resolve().parent.parent)}
        self.daemon = Daemon("pdudaemon", [pdudaemon_binary(), "--conf", str(conf),
                                           "--logfile", "-"],
                             self.runtime / "pdudaemon.log", env=env, part=self.part,
                             rig=self.rig).start()
        daemon = self.daemon

        def listening() -> bool:
            daemon.check()
            return tcp_listening(self.port, daemon.pid)  # pdudaemon, not who took the port

        # aiohttp binds after its imports (~1 s); there is no readiness signal to wait on
        wait_until(listening, 30, f"pdudaemon to listen on {self.host}:{self.port}",
                   seen=lambda: "port closed", interval=0.05, part="pdudaemon", rig=self.rig)
        return self

    def stop(self, grace: float = 0.5) -> None:
        """``grace`` 0: kill at once, so a request in flight gets no answer at all (on SIGTERM
        pdudaemon lets its switch command finish and answers it)."""
        if self.daemon is not None:
            self.daemon.stop(grace=grace)  # it ignores SIGTERM while a switch command runs
            self.daemon = None

