"""A relay driven by a GPIO line of the rig host (a Raspberry Pi running the bench, a GPIO
expander), through libgpiod v2 (the ``gpiod`` Python package, character device API).

The line is requested as an output on the first switch and held until ``close()``: releasing it
would let it float and the relay with it. ``active_low`` is for relay modules whose input is
active low (most opto-isolated boards): the kernel inverts the line, so "active" still means
"coil energised". ``is_on()`` reads back the value the kernel drives; it is None until this
driver has driven the line (requesting it just to look would take it from its owner).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from hil.errors import InfraError
from hil.power import NORMALLY_DOC, Normally, call_with_deadline, coil_for, power_from_coil
from hil.registry import PartContext, Settings


class GpioRelaySettings(Settings):
    chip: str = Field("gpiochip0", description="GPIO chip: a name (gpiochip0) or a path")
    line: int | str = Field(description="line offset on the chip, or the line's name "
                            "(e.g. GPIO17 on a Raspberry Pi)")
    active_low: bool = Field(False, description="the relay module switches on a low level")
    drive: Literal["push-pull", "open-drain", "open-source"] = Field(
        "push-pull", description="output drive of the line")
    normally: Normally = Field("open", description=NORMALLY_DOC)
    timeout: float = Field(2.0, gt=0, description="seconds for one switch")


class GpioRelay:
    Settings = GpioRelaySettings

    def __init__(self, settings: GpioRelaySettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        chip = settings.chip
        self.chip_path = chip if "/" in chip else str(Path("/dev") / chip)
        self._request: Any = None
        self._lock = threading.Lock()

    def _gpiod(self) -> Any:
        try:
            import gpiod
        except ImportError as exc:
            raise self.ctx.error(f"the gpiod library is not installed ({exc}): pip install "
                                 f"gpiod") from None
        return gpiod

    def _drive(self, coil: bool) -> None:
        gpiod = self._gpiod()
        from gpiod.line import Direction, Drive, Value

        s = self.settings
        value = Value.ACTIVE if coil else Value.INACTIVE
        if self._request is None:
            drive = {"push-pull": Drive.PUSH_PULL, "open-drain": Drive.OPEN_DRAIN,
                     "open-source": Drive.OPEN_SOURCE}[s.drive]
            config = {s.line: gpiod.LineSettings(direction=Direction.OUTPUT, drive=drive,
                                                 active_low=s.active_low, output_value=value)}
            self._request = gpiod.request_lines(self.chip_path, consumer=f"hil:{self.ctx.rig}",
                                                config=config)
        else:
            self._request.set_value(s.line, value)

    def _read(self) -> bool:
        from gpiod.line import Value

        return bool(self._request.get_value(self.settings.line) == Value.ACTIVE)

    def _switch(self, power_on: bool) -> None:
        s = self.settings
        coil = coil_for(power_on, s.normally)

        def op() -> bool:
            self._drive(coil)
            return self._read()

        with self._lock:
            try:
                seen = call_with_deadline(op, s.timeout, f"GPIO {self.chip_path} line {s.line}",
                                          part=self.ctx.part, rig=self.ctx.rig)
            except InfraError:
                raise
            except (OSError, ValueError) as exc:  # no such chip/line, line busy (EBUSY)
                raise self.ctx.error(f"GPIO {self.chip_path} line {s.line}: {exc}") from None
        if seen != coil:
            raise self.ctx.error(f"GPIO line {s.line} reads {'active' if seen else 'inactive'} "
                                 f"after driving it {'active' if coil else 'inactive'}")

    def on(self) -> None:
        try:
            self._switch(True)
        except InfraError:
            with contextlib.suppress(InfraError):
                self._switch(False)
            raise

    def off(self) -> None:
        self._switch(False)

    def is_on(self) -> bool | None:
        with self._lock:
            if self._request is None:
                return None
            return power_from_coil(self._read(), self.settings.normally)

    def close(self) -> None:
        with self._lock:
            request, self._request = self._request, None
        if request is not None:
            with contextlib.suppress(Exception):
                request.release()
