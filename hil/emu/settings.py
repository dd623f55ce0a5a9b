"""The ``emulator:`` section of a rig file, as models: ``hil.config`` validates it when the rig
file loads (errors name file, line and key), without importing the bench that runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from hil.power import Normally
from hil.qemu.target import QemuSettings
from hil.registry import Settings


class RelayEmu(Settings):
    channels: int = Field(4, ge=1, le=8, description="relays on the emulated board")
    status: Literal["none", "text", "bytes"] = Field(
        "text", description="how the board answers the FF status query: text ('CH1:ON' "
        "lines), bytes (one per channel), none (an LCUS-1: no answer)")
    normally: Normally | None = Field(None, description="which contact the board's supply "
                                      "is wired through; default: what the power: part says")


class PduEmu(Settings):
    pass


class ConsoleEmu(Settings):
    tty: str = Field("console-tty", description="the adapter's tty link (relative: in the "
                     "runtime directory), what ser2net opens")


class InternalDiskEmu(Settings):
    image: Path = Field(Path("internal-disk.img"), description="the board's own storage (eMMC, "
                        "SSD) that a flasher image installs to: an image file (relative: in "
                        "the runtime directory)")
    size: int = Field(4 * 1024**3, gt=0, description="bytes; created blank (sparse)")


class EmulatorSettings(Settings):
    board: QemuSettings = Field(QemuSettings(), description="the QEMU machine standing in for "
                                "the board (same keys as target: {driver: qemu})")
    relay: RelayEmu | None = Field(None, description="emulate the serial relay board of power:")
    pdu: PduEmu | None = Field(None, description="run pdudaemon for the power: part")
    console: ConsoleEmu | None = Field(None, description="the board's UART behind ser2net at "
                                       "the console: part's rfc2217:// port")
    internal_disk: InternalDiskEmu | None = Field(
        None, description="give the board a disk of its own besides the SD mux's card (a "
        "flasher board's eMMC or SSD); the card, when in the board, comes first in boot order")
    libvirtd: bool = Field(False, description="start libvirtd (and virtlogd) unless one runs "
                           "already: for target: {driver: libvirt} rigs")

    @property
    def has_board(self) -> bool:
        return any(x is not None for x in (self.relay, self.pdu, self.console))
