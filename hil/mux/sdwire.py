"""SDWire / SDWireC (Tizen design, FTDI FT200X) and Badgerd SDWire Gen2 muxes, through their
command-line tools: ``sd-mux-ctrl`` (C, libftdi) or ``sdwire`` (the Badgerd Python CLI).

``sd-mux-ctrl -e <serial> --ts|--dut`` switches and ``-u`` reads the state back
("SD connected to: TS|DUT"). It has no "off" position: ``off()`` leaves the card where it is.
``sdwire switch -s <serial> host|target|off`` switches; it has no read-back here, so
``state()`` is None with that tool.
"""

from __future__ import annotations

import re
import shutil
from typing import Literal

from pydantic import Field

from hil.mux._command import run_tool
from hil.registry import PartContext, Settings


class SdWireSettings(Settings):
    serial: str | None = Field(None, description="the SDWire's USB serial (sd-mux-ctrl --list, "
                               "`sdwire list`, `hil discover`); none: the only one attached")
    tool: Literal["auto", "sd-mux-ctrl", "sdwire"] = Field(
        "auto", description="which command to use; auto: sd-mux-ctrl if installed, else sdwire")
    timeout: float = Field(10.0, gt=0, description="seconds for one switch")


class SdWire:
    Settings = SdWireSettings

    def __init__(self, settings: SdWireSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx

    def tool(self) -> str:
        wanted = self.settings.tool
        for name in (["sd-mux-ctrl", "sdwire"] if wanted == "auto" else [wanted]):
            if shutil.which(name):
                return name
        names = "sd-mux-ctrl or sdwire" if wanted == "auto" else wanted
        raise self.ctx.error(f"no SDWire tool found ({names} on PATH; pip install sdwire, or "
                             f"build sd-mux-ctrl)")

    def _run(self, *args: str) -> str:
        return run_tool(list(args), self.settings.timeout, part=self.ctx.part, rig=self.ctx.rig)

    def _switch(self, mode: Literal["host", "dut", "off"]) -> None:
        tool, serial = self.tool(), self.settings.serial
        if tool == "sdwire":
            self._run("sdwire", "switch", *(["-s", serial] if serial else []),
                      {"host": "host", "dut": "target", "off": "off"}[mode])
            return
        if mode == "off":
            return  # an SDWire has no off position
        self._run("sd-mux-ctrl", *(["-e", serial] if serial else []),
                  "--ts" if mode == "host" else "--dut")
        seen = self.state()
        if seen != mode:
            raise self.ctx.error(f"SDWire reads {seen!r} after switching to {mode!r}")

    def to_host(self) -> None:
        self._switch("host")

    def to_dut(self) -> None:
        self._switch("dut")

    def off(self) -> None:
        self._switch("off")

    def state(self) -> str | None:
        if self.tool() != "sd-mux-ctrl":
            return None
        serial = self.settings.serial
        out = self._run("sd-mux-ctrl", *(["-e", serial] if serial else []), "-u")
        m = re.search(r":\s*(TS|DUT)\b", out, re.IGNORECASE)
        if m is None:
            raise self.ctx.error(f"sd-mux-ctrl -u printed {out.strip()!r}")
        return "host" if m.group(1).upper() == "TS" else "dut"

    def close(self) -> None:
        pass
