"""Driver registry: maps ``(part, driver)`` from a rig file to the class that drives it.

Built-in drivers are named here by import path, so validating a rig file imports only the
modules it uses (and never a hardware library a bench does not have). Third parties add drivers
with an entry point in the group ``hil.drivers`` named ``<part>.<driver>``, value
``module:Class``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from hil.errors import InfraError

# The part kinds a rig file may have, in the order a rig builds them (the target first: it
# brings power, console, storage and network of its own).
PARTS = ("target", "power", "console", "sd_mux", "storage", "network")

BUILTIN: dict[tuple[str, str], str] = {
    ("target", "qemu"): "hil.qemu.target:QemuTarget",
    ("target", "libvirt"): "hil.qemu.libvirt:LibvirtTarget",
    ("power", "serial-relay"): "hil.power.serial_relay:SerialRelay",
    ("power", "hid-relay"): "hil.power.hid_relay:HidRelay",
    ("power", "gpio"): "hil.power.gpio:GpioRelay",
    ("power", "pdudaemon"): "hil.power.pdudaemon:PduDaemon",
    ("power", "command"): "hil.power.command:CommandPower",
    ("power", "manual"): "hil.power.manual:ManualPower",
    ("sd_mux", "usbsdmux"): "hil.mux.usbsdmux:UsbSdMux",
    ("sd_mux", "sdwire"): "hil.mux.sdwire:SdWire",
    ("sd_mux", "virtual"): "hil.mux.virtual:VirtualMux",
    ("sd_mux", "lab"): "hil.lab.remote:BenchMux",
    ("console", "serial"): "hil.console.serial:SerialConsole",
    ("storage", "block"): "hil.storage:BlockStorage",
    ("storage", "file"): "hil.storage:FileStorage",
    ("storage", "lab"): "hil.lab.remote:BenchStorage",
    ("network", "ssh"): "hil.network:SshNetwork",
}


class Settings(BaseModel):
    """Base of every settings model (drivers', the emulator's, the rig file's own): an unknown
    key is an error, so a typo cannot pass silently, and settings never change once loaded.
    A number must be finite: an infinite timeout would be a wait without a deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class PartContext:
    """What a driver may know about the rig it belongs to."""

    rig: str
    part: str
    runtime: Path  # private scratch directory of this rig (sockets, pid files)
    device_type: Any  # hil.config.DeviceType (Any to keep this module import-light)

    def error(self, message: str) -> InfraError:
        """A failure of this part, named by rig and part."""
        return InfraError(message, part=self.part, rig=self.rig)


class Driver(Protocol):
    Settings: type[BaseModel]

    def __init__(self, settings: Any, ctx: PartContext) -> None: ...


def _third_party() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for ep in entry_points(group="hil.drivers"):
        part, _, name = ep.name.partition(".")
        found[(part, name)] = ep.value
    return found


def known(part: str) -> list[str]:
    names = {n for (p, n) in BUILTIN if p == part} | {n for (p, n) in _third_party() if p == part}
    return sorted(names)


def lookup(part: str, name: str) -> type[Driver] | None:
    """The driver class, or None when no such driver is registered."""
    target = BUILTIN.get((part, name)) or _third_party().get((part, name))
    if target is None:
        return None
    module, _, attr = target.partition(":")
    cls: type[Driver] = getattr(importlib.import_module(module), attr)
    return cls
