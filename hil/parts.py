"""One small protocol per capability. A QEMU board and a bench implement the same ones, so the
suites never ask which they have. Consoles are all ``hil.console.serial.SerialConsole`` (every
console is a pyserial URL), so there is no protocol for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Power(Protocol):
    def on(self) -> None: ...
    def off(self) -> None: ...
    def is_on(self) -> bool | None:
        """The switch's state read back from the device; None where it cannot report."""
        ...
    def close(self) -> None: ...


@runtime_checkable
class SdMux(Protocol):
    def to_host(self) -> None:
        """Connect the card to the rig host (its block device then appears)."""
        ...
    def to_dut(self) -> None:
        """Connect the card to the board. Card-detect is not toggled: power-cycle after."""
        ...
    def off(self) -> None: ...
    def state(self) -> str | None:
        """"host", "dut", "off", or None where the mux cannot report."""
        ...
    def close(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    fixed: bool  # the rig's own disk, not removable media: lifts the removable check

    def target(self, timeout: float) -> Path:
        """The file or block device to write the image to, once it is there."""
        ...
    def close(self) -> None: ...


@runtime_checkable
class RemoteStorage(Protocol):
    """A medium that another host writes (a lab bench host): ``Rig.flash`` hands it the image
    instead of writing a local ``target``."""

    where: str  # the medium, as the timeline names it

    def write(self, image: Path, bmap: Path | None, timeout: float) -> Any:
        """Write and verify; the writer's ``FlashReport``."""
        ...


@runtime_checkable
class Network(Protocol):
    host_address: str  # the rig host as the DUT sees it (NTP server, API endpoint)

    def ssh_endpoint(self) -> tuple[str, int]: ...
    def close(self) -> None: ...
