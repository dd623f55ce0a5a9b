"""A virtual SD mux for emulated benches: the "card" is a disk image file, switched between the
rig host (the flasher) and an emulated board (QEMU, see ``hil.emu``).

What emulates a real mux best on a Linux host is a loop device (``host_side: loop``, root
only): switching to the host attaches the image to a free loop device, and the kernel announces
the new medium with a uevent exactly as a USB card reader does, so the rig's ``storage:
{driver: block}`` waits for it through udev the same way a bench does. Match it with
``ATTR{loop/backing_file}: '*/<image name>'`` (the loop device has no serial). Switching to
the DUT syncs and detaches it; the block device's size drops to 0, as a reader's does when the
card leaves. ``host_side: file`` skips the loop device: the flasher writes the file itself
(``storage: {driver: file}``), for hosts without root or loop devices.

The mux position is kept in ``<image>.mux`` beside the image; the emulated board reads it when
it is powered on: it gets the card only in position ``dut``. Like a real mux, switching while
the board runs does not eject the card under it: the boot flows power the board off first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import Field

from hil.deadline import Deadline, wait_until
from hil.errors import DeadlineError
from hil.registry import PartContext, Settings

log = logging.getLogger(__name__)

Position = Literal["host", "dut", "off"]


class VirtualMuxSettings(Settings):
    image: Path = Field(Path("sdcard.img"), description="the card: a disk image (relative: in "
                        "the rig's runtime directory); name it after the rig so `storage:` "
                        "can match its loop device")
    size: int = Field(2 * 1024**3, gt=0, description="bytes; a missing image is created as a "
                      "blank (sparse) card of this size")
    host_side: Literal["loop", "file"] = Field(
        "loop", description="loop: the card appears to the host as a block device (needs "
        "root); file: the flasher writes the image file directly")
    timeout: float = Field(10.0, gt=0, description="seconds for one switch")


def card_paths(settings: VirtualMuxSettings, runtime: Path) -> tuple[Path, Path]:
    """(image, position file) of a virtual mux, as the driver and the emulated board see it."""
    image = settings.image if settings.image.is_absolute() else runtime / settings.image
    return image, image.with_name(image.name + ".mux")


def read_position(position_file: Path) -> Position:
    try:
        text = position_file.read_text().strip()
    except FileNotFoundError:
        return "off"
    return text if text in ("host", "dut") else "off"  # type: ignore[return-value]


def loops_backing(image: Path) -> list[Path]:
    """Loop devices whose backing file is ``image``."""
    target = str(image.resolve())
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:  # not attached
            continue
        if backing in (target, target + " (deleted)"):
            found.append(Path("/dev") / entry.name)
    return sorted(found)


class VirtualMux:
    Settings = VirtualMuxSettings

    def __init__(self, settings: VirtualMuxSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        self.image, self.position_file = card_paths(settings, ctx.runtime)

    def _ensure_card(self) -> None:
        if not self.image.exists():
            self.image.parent.mkdir(parents=True, exist_ok=True)
            with self.image.open("wb") as f:
                f.truncate(self.settings.size)

    def _set_position(self, position: Position) -> None:
        tmp = self.position_file.with_name(self.position_file.name + ".tmp")
        tmp.write_text(position + "\n")
        tmp.replace(self.position_file)

    def _losetup(self, *args: str, deadline: Deadline) -> str:
        try:
            proc = subprocess.run(["losetup", *args], capture_output=True, text=True,
                                  timeout=max(0.1, deadline.remaining()), check=False)
        except FileNotFoundError:
            raise self.ctx.error("losetup is not installed (util-linux)") from None
        except subprocess.TimeoutExpired:
            raise self.ctx.error(f"losetup {' '.join(args)} did not finish within "
                                 f"{deadline.timeout:.1f}s") from None
        if proc.returncode != 0:
            raise self.ctx.error(f"losetup {' '.join(args)} failed: {proc.stderr.strip()}"
                                 + ("" if os.geteuid() == 0 else
                                    " (loop devices need root: use host_side: file)"))
        return proc.stdout.strip()

    def _detach(self, deadline: Deadline) -> None:
        for loop in loops_backing(self.image):
            # what the flasher wrote may still sit in the loop device's page cache
            with contextlib.suppress(OSError):
                fd = os.open(loop, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._losetup("-d", str(loop), deadline=deadline)
        # The kernel defers the detach while someone holds the device open. Normally it is
        # done when losetup returns; this only waits out a flasher that is still closing.
        try:
            wait_until(lambda: not loops_backing(self.image), max(0.0, deadline.remaining()),
                       "the card's loop device to detach",
                       seen=lambda: ", ".join(map(str, loops_backing(self.image))),
                       interval=0.02)
        except DeadlineError:
            raise self.ctx.error(f"the card is still attached to the host as "
                                 f"{', '.join(map(str, loops_backing(self.image)))}: something "
                                 f"holds it open") from None

    def to_host(self) -> None:
        deadline = Deadline(self.settings.timeout)
        self._ensure_card()
        self._set_position("host")  # the board no longer gets the card at its next power-on
        if self.settings.host_side == "loop" and not loops_backing(self.image):
            loop = self._losetup("--find", "--show", str(self.image), deadline=deadline)
            log.debug("%s: card %s on the host as %s", self.ctx.rig, self.image, loop)

    def to_dut(self) -> None:
        deadline = Deadline(self.settings.timeout)
        self._ensure_card()
        self._detach(deadline)
        self._set_position("dut")

    def off(self) -> None:
        self._detach(Deadline(self.settings.timeout))
        self._set_position("off")

    def state(self) -> str | None:
        return read_position(self.position_file)

    def host_device(self) -> Path | None:
        """The loop device the card is attached as, if it is on the host side."""
        loops = loops_backing(self.image)
        return loops[0] if loops else None

    def close(self) -> None:
        pass
