"""Storage: where an image is written. A disk file (QEMU, virtual SD mux) or a block device
(an SD card behind a mux, a USB stick), found by udev properties so it survives re-plugging."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from hil.registry import PartContext, Settings


class FileStorageSettings(Settings):
    path: Path = Field(description="disk image file the board boots from")
    size: int = Field(2 * 1024**3, gt=0, description="bytes; the file is sparse")


class FileStorage:
    """A disk image file. Flashing writes into it as it would into an SD card."""

    Settings = FileStorageSettings
    fixed = True  # it is the rig's own disk: no removable-media check

    def __init__(self, settings: FileStorageSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        self.path = settings.path if settings.path.is_absolute() else ctx.runtime / settings.path

    def target(self, timeout: float) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with self.path.open("wb") as f:
                f.truncate(self.settings.size)
        return self.path

    def close(self) -> None:
        pass


class BlockStorageSettings(Settings):
    device: Path | None = Field(None, description="/dev/disk/by-id/... (stable name)")
    match: dict[str, str] | None = Field(None, description="udev properties of the disk "
                                         "(ID_SERIAL_SHORT, ID_PATH); see `hil discover`")
    fixed: bool = Field(False, description="true if the disk is not removable (a NUC's SSD "
                        "seen through a mux): lifts the removable-media safety check")

    @model_validator(mode="after")
    def _one(self) -> BlockStorageSettings:
        if (self.device is None) == (self.match is None):
            raise ValueError("give exactly one of 'device' or 'match'")
        return self


class BlockStorage:
    Settings = BlockStorageSettings

    def __init__(self, settings: BlockStorageSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        self.fixed = settings.fixed

    def target(self, timeout: float) -> Path:
        """The block device node, waited for by udev event (it appears after a mux switch)."""
        from hil.udev import wait_for_block

        return wait_for_block(self.settings.device, self.settings.match, timeout,
                              rig=self.ctx.rig)

    def close(self) -> None:
        pass


