"""The person at the bench is the power switch: each switch is asked for on the terminal and
waits for Enter. For bringing up a new board before its relay is wired.

It talks to the controlling terminal (``/dev/tty``) directly, so pytest's output capture does
not swallow the question. Without a terminal, or in CI (``CI`` set), it refuses at once with an
infrastructure error instead of waiting for someone who is not there.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios

from pydantic import Field

from hil.registry import PartContext, Settings


class ManualPowerSettings(Settings):
    hint: str = Field("", description="where the switch is, shown with each question "
                      "(e.g. 'the USB-C cable on hub port 3')")
    tty: str = Field("/dev/tty", description="terminal to ask on")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the answer")


class ManualPower:
    Settings = ManualPowerSettings

    def __init__(self, settings: ManualPowerSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx

    def _ask(self, action: str) -> None:
        s = self.settings
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            raise self.ctx.error(f"manual power needs a person at the bench to switch the board "
                                 f"{action}, and this is CI (CI={os.environ['CI']}): give the rig "
                                 f"a relay or PDU")
        try:
            fd = os.open(s.tty, os.O_RDWR | os.O_NOCTTY)
        except OSError as exc:
            raise self.ctx.error(f"manual power needs a terminal to ask the person at the bench to "
                                 f"switch the board {action}, and {s.tty} cannot be opened "
                                 f"({exc.strerror})") from None
        try:
            if not os.isatty(fd):
                raise self.ctx.error(f"manual power: {s.tty} is not a terminal")
            with contextlib.suppress(termios.error):
                termios.tcflush(fd, termios.TCIFLUSH)  # a stray key press must not answer
            where = f" ({s.hint})" if s.hint else ""
            os.write(fd, f"\n[rig {self.ctx.rig}] Switch the board's power {action.upper()}"
                         f"{where}, then press Enter (type 'fail' if you cannot): ".encode())
            ready, _, _ = select.select([fd], [], [], s.timeout)
            if not ready:
                os.write(fd, b"\n")
                raise self.ctx.error(f"nobody confirmed switching the power {action} within "
                                     f"{s.timeout:.0f}s")
            answer = os.read(fd, 1024).decode(errors="replace").strip().lower()
            if answer in ("fail", "f", "no", "n"):
                raise self.ctx.error(f"the person at the bench could not switch the power "
                                     f"{action}")
        finally:
            os.close(fd)

    def on(self) -> None:
        self._ask("on")

    def off(self) -> None:
        self._ask("off")

    def is_on(self) -> bool | None:
        return None

    def close(self) -> None:
        pass
