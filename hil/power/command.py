"""Power through any command: a vendor CLI (``uhubctl``, ``ykushcmd``, ``snmpset``, a smart
plug's script). A string runs through ``sh -c``; a list runs as is. Each command has a
deadline; on expiry its whole process group is killed.

``status`` (optional) reads the state back: exit status 0 means on and 1 means off, or, with
``status_on``, the state is on when its output matches that regular expression. The commands
see ``HIL_RIG`` and ``HIL_PART`` in their environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess

from pydantic import Field

from hil.errors import InfraError
from hil.registry import PartContext, Settings


class CommandPowerSettings(Settings):
    on: str | list[str] = Field(description="command that switches the board on")
    off: str | list[str] = Field(description="command that switches the board off")
    status: str | list[str] | None = Field(
        None, description="command that reports the state: exit 0 = on, 1 = off (or see "
        "status_on)")
    status_on: str | None = Field(None, description="regular expression: the board is on "
                                  "when the status command's output matches it")
    timeout: float = Field(30.0, gt=0, description="seconds for one command")


class CommandPower:
    Settings = CommandPowerSettings

    def __init__(self, settings: CommandPowerSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx

    def _run(self, what: str, cmd: str | list[str]) -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        env = {**os.environ, "HIL_RIG": self.ctx.rig, "HIL_PART": self.ctx.part}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
        except OSError as exc:
            raise self.ctx.error(f"power {what} command {argv[0]!r} cannot run: "
                                 f"{exc.strerror}") from None
        try:
            out, err = proc.communicate(timeout=self.settings.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the command and anything it started
            proc.communicate()
            raise self.ctx.error(f"power {what} command did not finish within "
                                 f"{self.settings.timeout:.1f}s: {cmd}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _switch(self, what: str, cmd: str | list[str]) -> None:
        result = self._run(what, cmd)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()[-500:]
            raise self.ctx.error(f"power {what} command failed with exit status "
                                 f"{result.returncode}: {detail or '(no output)'}")

    def on(self) -> None:
        try:
            self._switch("on", self.settings.on)
        except InfraError:
            with contextlib.suppress(InfraError):
                self._switch("off", self.settings.off)
            raise

    def off(self) -> None:
        self._switch("off", self.settings.off)

    def is_on(self) -> bool | None:
        s = self.settings
        if s.status is None:
            return None
        result = self._run("status", s.status)
        if s.status_on is not None:
            return re.search(s.status_on, result.stdout) is not None
        if result.returncode in (0, 1):
            return result.returncode == 0
        raise self.ctx.error(f"power status command failed with exit status {result.returncode}: "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")

    def close(self) -> None:
        pass
