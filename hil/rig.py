"""Rig: one board and the hardware around it, composed from the parts in its rig file.

``state`` is a ``RigState``; every step is timed into ``timeline`` and noted in the console log.
``close()`` leaves the board powered off, the SD mux released and the lock free, whatever
happened before (Ctrl-C included); only a bench command that ends well leaves the board as it
set it (``close(power_off=False)``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from hil import registry, steps
from hil.cache import runtime_dir
from hil.config import RigConfig
from hil.console.log import ConsoleLog, EventKind, StopEvent
from hil.console.serial import SerialConsole
from hil.errors import DeviceError, HilError, InfraError, brief
from hil.parts import Network, Power, RemoteStorage, SdMux, Storage

log = logging.getLogger(__name__)

# How a board's kernel says it stopped (emergency level: printed even with ``quiet``). An
# installer is done when it powers the board off; halting or restarting means it gave up.
STOPPED = re.compile(rb"reboot: (Power down|System halted|Restarting system)")


class RigState(StrEnum):
    UNKNOWN = "unknown"  # before the first power switch: whatever the board was doing
    OFF = "off"
    FLASHED = "flashed"  # off, with the image on the board's medium
    BOOTING = "booting"  # powered, no shell yet
    READY = "ready"  # a shell answered since the last power-on (set by ``Dut.wait_ready``)


@dataclass
class Step:
    name: str
    part: str  # the rig part it drove ("power", "sd_mux", "storage", "flash", "console")
    seconds: float
    ok: bool
    detail: str = ""  # a failed step's whole error (the summary shows ``errors.brief`` of it)
    device_wait: bool = False  # waiting on the device (a shell, an installer), not hardware
    at: int = 0  # console offset at its start: which test's span it is in
    began: float = 0.0  # time.time() at its start
    note: str = ""  # what a step that went well reports (a flash: throughput, verify)


class Rig:
    def __init__(self, config: RigConfig, runtime: Path | None = None, *,
                 fence: Callable[[], str | None] | None = None) -> None:
        self.config = config
        # why the rig is no longer ours (a lab lease ended), so its parts refuse us
        self.fence = fence
        self.name = config.name
        self.runtime = runtime or runtime_dir("rigs", config.name)
        self.timeline: list[Step] = []
        self.target: Any = None
        parts: dict[str, Any] = {}
        self._owned: list[Any] = []
        if "target" in config.parts:
            self.target = self._make("target")
            parts.update(self.target.parts())
        for name in registry.PARTS:
            if name == "target":
                continue
            if name in config.parts:
                parts[name] = self._make(name)
        self.power: Power = parts["power"]
        self.console: SerialConsole = parts["console"]
        self.sd_mux: SdMux | None = parts.get("sd_mux")
        self.storage: Storage | None = parts.get("storage")
        self.network: Network | None = parts.get("network")
        self.state = RigState.UNKNOWN
        self.flash_report: Any = None
        self._off_since: float | None = None  # monotonic time of the last power off

    def _make(self, part: str) -> Any:
        spec = self.config.parts[part]
        cls = registry.lookup(part, spec.driver)
        assert cls is not None  # config loading checked it
        ctx = registry.PartContext(self.name, part, self.runtime, self.config.device_type)
        try:
            obj = cls(spec.settings, ctx)
        except HilError:
            raise
        except Exception as exc:
            raise InfraError(f"driver {spec.driver!r} failed to start: {exc}", part=part,
                             rig=self.name) from exc
        self._owned.append(obj)
        return obj

    @property
    def log(self) -> ConsoleLog:
        return self.console.log

    @contextlib.contextmanager
    def step(self, name: str, part: str, *, device_wait: bool = False) -> Iterator[Step]:
        """Time a step (the caller may set its ``note``); a non-framework exception from a
        driver becomes an InfraError."""
        t0 = time.monotonic()
        step = Step(name, part, 0.0, True, device_wait=device_wait, at=self.log.end,
                    began=time.time())
        self.log.note(EventKind.STEP, name)

        def record(ok: bool, detail: str = "") -> None:
            step.seconds, step.ok, step.detail = time.monotonic() - t0, ok, detail
            self.timeline.append(step)

        try:
            with steps.span(name):
                yield step
        except HilError as exc:
            record(False, str(exc))
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            record(False, str(exc))
            raise InfraError(f"{name}: {exc}", part=part, rig=self.name) from exc
        record(True)
        log.info("rig %s: %s (%.1fs)", self.name, name, time.monotonic() - t0)

    # --- power ----------------------------------------------------------------------------------
    def power_on(self) -> None:
        with self.step("power on", "power"):
            if self._off_since is not None:
                # Deliberate: boards need their capacitors drained; the rig file sets how long.
                left = self._off_since + self.config.power_off_time - time.monotonic()
                time.sleep(max(0.0, left))
            if not self.console.attached and self.target is None:
                self.console.attach()  # a bench console is open before the board gets power
            self.log.note(EventKind.POWER_ON)  # first: the board's first byte comes after it
            self.power.on()
        self.state = RigState.BOOTING

    def power_off(self) -> None:
        with self.step("power off", "power"):
            self.power.off()
            self.log.note(EventKind.POWER_OFF)
        self._off_since = time.monotonic()
        self.state = RigState.OFF

    def power_cycle(self) -> None:
        self.power_off()
        self.power_on()  # after the rig's off-time

    # --- flashing -------------------------------------------------------------------------------
    def flash(self, image: Path, bmap: Path | None = None) -> Any:
        """Power off, give the medium to the host, write and verify, give it back to the board."""
        from hil.flash.writer import flash as write_image

        if self.storage is None:
            raise InfraError("the rig file has no 'storage:' to flash", part="storage",
                             rig=self.name)
        self.power_off()
        if self.sd_mux is not None:
            with self.step("sd mux → host", "sd_mux"):
                self.sd_mux.to_host()
        if isinstance(self.storage, RemoteStorage):  # written where it is wired
            with self.step(f"flash {image.name} → {self.storage.where}", "storage") as step:
                self.flash_report = self.storage.write(image, bmap, self.config.timeouts.flash)
                step.note = self.flash_report.summary()
        else:
            with self.step("wait for storage", "storage"):
                target = self.storage.target(self.config.timeouts.mux)
            with self.step(f"flash {image.name} → {target}", "flash") as step:
                self.flash_report = write_image(image, target, bmap=bmap,
                                                allow_fixed=self.storage.fixed)
                step.note = self.flash_report.summary()
        if self.sd_mux is not None:
            with self.step("sd mux → board", "sd_mux"):
                self.sd_mux.to_dut()
        if self.config.device_type.flasher:
            self.install()
        self.state = RigState.FLASHED
        return self.flash_report

    def medium_to_board(self) -> None:
        """Give the card to the board without writing it (a session with ``--no-flash``): the
        last session's end left the mux off. A flasher board's card is its installer, which
        must stay away so that the installed OS boots."""
        if self.sd_mux is not None and not self.config.device_type.flasher:
            with self.step("sd mux → board", "sd_mux"):
                self.sd_mux.to_dut()

    def install(self) -> None:
        """Flasher boards (NUC, BeagleBone Black): the medium just written holds an installer.
        Boot it, wait until it has written the internal disk and powered the board off, then
        take the medium away so the next power-on boots the installed OS."""
        if self.sd_mux is None:
            raise InfraError("a flasher board needs an sd_mux: to switch the installer medium "
                             "away once it has run", part="sd_mux", rig=self.name)
        start = self.log.end
        self.power_on()
        with self.step("installer runs", "flash", device_wait=True), \
                self.log.tally.timing("boot"):
            expected = "the installer to power the board off ('reboot: Power down')"
            try:
                hit = self.log.wait_for(STOPPED, start, self.config.timeouts.install, expected,
                                        stop_on=(EventKind.PANIC,))
            except StopEvent as exc:
                raise DeviceError(f"kernel panic while the installer ran: {exc.event.text}",
                                  tail=exc.tail) from None
            if hit.groups[0] != b"Power down":
                raise DeviceError(f"the installer stopped with {hit.data.decode()!r} instead of "
                                  "powering the board off", tail=self.log.tail())
        self.power_off()
        with self.step("sd mux → off (installer medium away)", "sd_mux"):
            self.sd_mux.off()

    # --- teardown -------------------------------------------------------------------------------
    def make_safe(self) -> None:
        """Power off and release the mux, as a session's end or an interrupted command must
        leave the rig. Never raises: it runs on the way out. Under a lease the lab ended it
        touches nothing: the bench host cleans the rig, and a request could still be taken
        (pdudaemon queues it) before that host closes the lease's endpoints."""
        ended = self.fence() if self.fence is not None else None
        if ended:
            log.info("rig %s: power off and mux release left to the lab during teardown: the "
                     "lease ended (%s)", self.name, brief(ended))
            self.state = RigState.OFF
            return
        for what, action in (("power off", self.power.off),
                             ("sd mux off", self.sd_mux.off if self.sd_mux else None)):
            if action is None:
                continue
            try:
                action()
            except Exception as exc:
                ended = self.fence() if self.fence is not None else None
                if ended:  # refused, as it must be: the bench host cleans the rig now
                    log.info("rig %s: %s refused during teardown: the lease ended (%s)",
                             self.name, what, brief(ended))
                else:
                    log.error("rig %s: %s failed during teardown: %s", self.name, what, exc)
        self.state = RigState.OFF

    def close(self, *, power_off: bool = True) -> None:
        """Power off, release the mux, close everything. Never raises: it runs on the way out.
        ``power_off=False`` (a bench command that powered the board on or switched the mux)
        closes the parts and leaves the board as it is, where its power outlives this process
        (a relay, a PDU; a QEMU board is this process's child and stops with it)."""
        if power_off:
            self.make_safe()
        for obj in reversed(self._owned):
            with contextlib.suppress(Exception):
                obj.close()
        if power_off:
            self.state = RigState.OFF
