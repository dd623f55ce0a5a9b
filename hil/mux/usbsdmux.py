"""Linux Automation's USB-SD-Mux through the ``usbsdmux`` package: its Python API
(``autoselect_driver(sg).mode_host()``), or its command line ``usbsdmux /dev/sgN host``.

The mux is addressed by its SCSI generic node. The package's udev rules give it a stable name
(``/dev/usb-sd-mux/id-<serial>``); without them, ``match`` finds it by the mux's USB serial
(``ATTRS{serial}``). Every switch is read back with ``get``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hil.errors import InfraError
from hil.mux._command import find_tool, run_tool
from hil.power import call_with_deadline
from hil.registry import PartContext, Settings


class UsbSdMuxSettings(Settings):
    sg: str | None = Field(None, description="the mux's SCSI generic node, best the stable "
                           "/dev/usb-sd-mux/id-<serial> link from the usbsdmux udev rules")
    match: dict[str, str] | None = Field(None, description="udev properties or ATTRS{} of the "
                                         "mux's scsi_generic device instead of sg (e.g. "
                                         "ATTRS{serial}: '000000000123')")
    interface: Literal["api", "cli"] = Field("api", description="the usbsdmux Python API, or "
                                             "its `usbsdmux` command")
    timeout: float = Field(10.0, gt=0, description="seconds for one switch including read-back")

    @model_validator(mode="after")
    def _one(self) -> UsbSdMuxSettings:
        if (self.sg is None) == (self.match is None):
            raise ValueError("give exactly one of 'sg' or 'match'")
        return self


class UsbSdMux:
    Settings = UsbSdMuxSettings

    def __init__(self, settings: UsbSdMuxSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx

    def sg(self) -> str:
        if self.settings.sg is not None:
            if not Path(self.settings.sg).exists():
                raise self.ctx.error(f"USB-SD-Mux {self.settings.sg} not found (unplugged? for "
                                     f"/dev/usb-sd-mux/ links the usbsdmux udev rules must be "
                                     f"installed; `hil discover` lists the muxes)")
            return self.settings.sg
        from hil.udev import find_node

        assert self.settings.match is not None
        return find_node("scsi_generic", self.settings.match, part=self.ctx.part,
                         rig=self.ctx.rig)

    # --- the two ways in ---------------------------------------------------------------------
    def _api(self, mode: str | None) -> str:
        sg = self.sg()

        def op() -> str:
            from usbsdmux.usbsdmux import autoselect_driver

            ctl: Any = autoselect_driver(sg)
            if mode == "host":
                ctl.mode_host()
            elif mode == "dut":
                ctl.mode_DUT()
            elif mode == "off":
                ctl.mode_disconnect()
            return str(ctl.get_mode())

        try:
            return call_with_deadline(op, self.settings.timeout, f"USB-SD-Mux {sg}",
                                      part=self.ctx.part, rig=self.ctx.rig)
        except InfraError:
            raise
        except ImportError as exc:
            raise self.ctx.error(f"the usbsdmux package is not installed ({exc})") from None
        except Exception as exc:  # OSError (ENOTTY, EACCES), UnknownUsbSdMuxRevisionException
            raise self.ctx.error(f"USB-SD-Mux {sg}: {type(exc).__name__}: {exc} (is it a "
                                 f"USB-SD-Mux, and may this user open it?)") from None

    def _cli(self, mode: str | None) -> str:
        sg = self.sg()
        if mode is not None:
            run_tool([find_tool("usbsdmux"), "--json", sg, mode], self.settings.timeout,
                     part=self.ctx.part, rig=self.ctx.rig)
        out = run_tool([find_tool("usbsdmux"), "--json", sg, "get"], self.settings.timeout,
                       part=self.ctx.part, rig=self.ctx.rig)
        try:
            return str(json.loads(out)["switch-state"])
        except (ValueError, KeyError, TypeError):
            raise self.ctx.error(f"usbsdmux {sg} get printed {out.strip()!r}") from None

    def _set(self, mode: str | None) -> str:
        state = (self._api if self.settings.interface == "api" else self._cli)(mode)
        if mode is not None and state != mode:
            raise self.ctx.error(f"USB-SD-Mux reads {state!r} after switching to {mode!r}")
        return state

    # --- SdMux ---------------------------------------------------------------------------------
    def to_host(self) -> None:
        self._set("host")

    def to_dut(self) -> None:
        self._set("dut")

    def off(self) -> None:
        self._set("off")

    def state(self) -> str | None:
        return self._set(None)

    def close(self) -> None:
        pass
