"""One test session on one rig: lock it, start its emulated hardware, prepare and flash the image,
boot, hand out the ``Dut``; on the way out power off, release, unlock. Used by the pytest plugin
and by ``hil`` commands; knows nothing of pytest."""

from __future__ import annotations

import contextlib
import importlib
import logging
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hil import redact
from hil.appregistry import SessionCA
from hil.cache import runtime_dir
from hil.config import RigConfig
from hil.dut import Dut
from hil.errors import ConfigError, brief
from hil.lock import RigLock
from hil.rig import Rig

if TYPE_CHECKING:
    from hil.refos.api import RegistrationServer
    from hil.refos.vpn import VpnServer

log = logging.getLogger(__name__)
# the session report's names for the rig parts whose steps are hardware time
HARDWARE_KIND = {"sd_mux": "mux", "storage": "flash"}


@dataclass
class Options:
    image: str | None = None
    bmap: Path | None = None
    config_json: Path | None = None
    rig_wait: float = 600.0
    flash: bool = True
    # why the rig is no longer this session's (a lab lease ended under it), or None
    fence: Callable[[], str | None] | None = None


def ssh_keypair(folder: Path) -> tuple[Path, str]:
    """A fresh ed25519 key for this session (never logged); returns (private path, public)."""
    key = folder / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pytest-hil",
                        "-f", str(key)], check=True, capture_output=True, timeout=30)
    return key, key.with_suffix(".pub").read_text().strip()


class Snapshot(NamedTuple):
    """A point in a session: monotonic time, seconds waited on the device and spent in the
    rig's hardware so far."""

    at: float
    device: float
    hardware: float


class HilSession:
    def __init__(self, config: RigConfig, options: Options) -> None:
        self.config = config
        self.options = options
        self.runtime = runtime_dir("rigs", config.name)
        self.lock = RigLock(config.name)
        self.stack = contextlib.ExitStack()
        self.rig: Rig | None = None
        self.dut: Dut | None = None
        self.image: Path | None = None
        self.device_config: dict[str, Any] = {}
        self.as_is: str | None = None  # why the image was flashed unconfigured, if it was
        self.api: RegistrationServer | None = None  # when the session built the reference OS
        self.vpn: VpnServer | None = None  # the API's VPN, where the host can run one
        self.no_vpn = ""  # why the API serves no VPN
        self.ssh_key, self.ssh_pub = ssh_keypair(self.runtime)
        # the CA the device trusts (config.json's balenaRootCA): the app registry's TLS
        self.ca = SessionCA(self.runtime / "ca")
        self.started: float | None = None  # monotonic, at start()
        self.ended: float | None = None  # monotonic, at the first close()
        self.ready: Snapshot | None = None  # at the end of start(): the device is up
        # wall, device and hardware seconds by suite (and the session start)
        self.by_suite: dict[str, list[float]] = {}
        self.leave_up = False  # close() leaves the board as it is (a bench command's end)

    # --- the whole bring-up ----------------------------------------------------------------------
    def open(self, what: str = "") -> Dut:
        """Lock the rig, start its emulated hardware, build its parts and the ``Dut``; touch
        no switch. ``start`` goes on to flash and boot; a bench command (``hil power`` ...)
        drives the parts itself."""
        self.lock.acquire(self.options.rig_wait, what, on_wait=lambda m: log.warning("%s", m))
        self.stack.callback(self.lock.release)
        if self.config.emulator:
            emu = importlib.import_module("hil.emu")
            self.stack.enter_context(emu.start(self.config, self.runtime))
        rig = self.rig = Rig(self.config, self.runtime, fence=self.options.fence)
        self.stack.callback(lambda: rig.close(power_off=not self.leave_up))
        # whether it runs the reference OS: told by flash(), else learnt from os-release
        self.dut = Dut(self.rig, ssh_key=self.ssh_key)
        self.stack.callback(self.dut.os.close)
        self.stack.callback(self.dut.ssh.close)
        return self.dut

    def start(self, what: str = "") -> Dut:
        self.started = time.monotonic()
        try:
            self.open(what)
            assert self.rig is not None and self.dut is not None
            if self.options.flash:
                self.flash(*self.prepare_image())
            else:
                self.rig.medium_to_board()
            self.dut.power_on()
            self.ready = self.snapshot()
            self.add_time("session start", Snapshot(self.started, 0.0, 0.0), self.ready)
            return self.dut
        except BaseException:
            self.close()
            raise

    def flash(self, image: Path, bmap: Path | None) -> None:
        """Write a prepared image; the host OS adapter forgets what it learnt of the last one
        (a bench command flashes the reference OS after the session opened without it)."""
        assert self.rig is not None and self.dut is not None
        self.rig.flash(image, bmap)
        self.dut.os.flashed(self.builds_reference_os or None)

    def close(self, *, leave_up: bool = False) -> None:
        """Undo everything ``open`` and ``start`` did: the board powered off, the mux released,
        the lock free; ``leave_up`` (a bench command that ended well) leaves the board as it
        is instead."""
        self.leave_up = leave_up
        self.stack.close()
        if self.started is not None and self.ended is None:
            self.ended = time.monotonic()

    # --- image ----------------------------------------------------------------------------------
    @property
    def builds_reference_os(self) -> bool:
        """The session flashes a reference OS image it builds (``--image refos``). Once the
        device is up, ``dut.os.is_reference_os`` is the answer for any image."""
        return self.options.flash and (self.options.image or self.config.image) == "refos"

    @property
    def refos_arch(self) -> str:
        """The reference OS build for this rig's device type."""
        return "x86_64" if self.config.device_type.arch in ("amd64", "x86_64") else "aarch64"

    def base_image(self) -> tuple[Path, Path | None]:
        name = self.options.image or self.config.image
        if not name:
            raise ConfigError("no image to flash: give --image, or 'image:' in "
                              f"{self.config.source}")
        if name == "refos":
            from hil.refos import build

            # flasher boards get the installer image, which installs the same OS
            built = build(arch=self.refos_arch, flasher=self.config.device_type.flasher)
            return built.disk, built.bmap
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"image {path} not found", key="--image")
        bmap = self.options.bmap
        for candidate in (path.with_name(path.name + ".bmap"),
                          path.with_suffix(".bmap")):
            if bmap is None and candidate.is_file():
                bmap = candidate
        return path, bmap

    def device_config_for(self, using_refos: bool) -> dict[str, Any]:
        """config.json for this session: the user's file, or one made for the reference OS."""
        if self.options.config_json:
            from hil.flash.configjson import load_config_json

            cfg = load_config_json(self.options.config_json)
        else:
            cfg = {"uuid": uuid.uuid4().hex, "deviceType": self.config.device_type.slug,
                   "developmentMode": True, "persistentLogging": False}
        cfg.setdefault("os", {}).setdefault("sshKeys", [])
        if self.ssh_pub not in cfg["os"]["sshKeys"]:
            cfg["os"]["sshKeys"].append(self.ssh_pub)
        cfg["balenaRootCA"] = self.ca.config_value(cfg.get("balenaRootCA"))
        if using_refos and "apiEndpoint" not in cfg:
            from hil.refos.api import RegistrationServer

            self.vpn = self._start_vpn()
            self.api = self.stack.enter_context(RegistrationServer(vpn=self.vpn))
            cfg["apiEndpoint"] = self.api.url_for_guest
            cfg["apiKey"] = self.api.api_key  # the provisioning key the endpoint accepts
        if using_refos and self.rig and self.rig.network:
            cfg.setdefault("ntpServers", self.rig.network.host_address)
        redact.register_config(cfg)
        return cfg

    def _start_vpn(self) -> VpnServer | None:
        """The API's VPN, which the devices' openvpn logs in to. None where this host lacks
        what it takes (logged; the VPN's checks skip, saying why); one that fails to start is
        an infrastructure error."""
        from hil.refos.vpn import VpnServer, available

        why = available()
        if why is not None:
            self.no_vpn = f"the session's API serves no VPN: {why}"
            log.warning("%s", self.no_vpn)
            return None
        return self.stack.enter_context(VpnServer(ca=self.ca))

    def prepare_image(self) -> tuple[Path, Path | None]:
        from hil.flash.configure import bmap_path, boot_partition, configure_image

        base, bmap = self.base_image()
        if not self.builds_reference_os and self.options.config_json is None:
            # Not a balenaOS image, and no config.json asked for: a porter's own image is
            # flashed as it is (it gets no config.json, so no session SSH key either).
            part, found = boot_partition(base)
            if part is None:
                self.as_is = (f"image {base} flashed as it is: no resin-boot or balena-boot "
                              f"partition to configure (it is a {found}), and no --config-json "
                              "asks for one; no config.json and no SSH key were put on it")
                log.warning("%s", self.as_is)
                self.image = base
                return base, bmap
        self.device_config = self.device_config_for(self.builds_reference_os)
        extra_txt = list(self.config.device_type.config_txt)
        log.info("configuring %s with %s", base.name, redact.config(self.device_config))
        self.image = configure_image(base, self.device_config, config_txt_lines=extra_txt)
        # The base image's bmap no longer matches (the boot partition changed): use the one
        # made for the prepared image.
        prepared_bmap = bmap_path(self.image)
        return self.image, prepared_bmap if prepared_bmap.is_file() else None

    def report_lines(self) -> list[str]:
        if self.rig is None:
            return []
        lines = [f"rig {self.config.name} ({self.config.device_type.slug}) timeline:"]
        if self.as_is:
            lines.insert(0, self.as_is)
        for step in self.rig.timeline:
            lines.append(f"  {step.seconds:7.2f}s  {'ok ' if step.ok else 'ERR'} {step.name}"
                         + (f" — {redact.text(brief(step.detail))}" if step.detail else ""))
        lines.append(f"rig state now: {self.rig.state}")
        lines.append(self.time_split())
        if self.by_suite:
            lines.append("time by suite: wall, waiting on the device, rig hardware, framework "
                         "and test code")
            width = max(len(k) for k in self.by_suite)
            for suite, (wall, device, hw) in self.by_suite.items():
                rest = max(0.0, wall - device - hw)
                lines.append(f"  {suite:<{width}} {wall:7.1f}s  device {device:6.1f}s "
                             f"({_pct(device, wall)})  hardware {hw:5.1f}s  framework "
                             f"{rest:5.1f}s ({_pct(rest, wall)})")
        if self.rig.log.path:
            lines.append(f"console log: {self.rig.log.path}")
        return lines

    def _waits_and_hardware(self) -> tuple[dict[str, float], dict[str, float]]:
        """Seconds so far waiting on the device (by kind) and in the rig's hardware steps (by
        part: power, mux, flash)."""
        assert self.rig is not None
        hardware: dict[str, float] = {}
        for step in self.rig.timeline:
            if not step.device_wait:  # a shell or an installer is the device's time
                kind = HARDWARE_KIND.get(step.part, step.part)
                hardware[kind] = hardware.get(kind, 0.0) + step.seconds
        return dict(self.rig.log.tally.seconds), hardware

    def snapshot(self) -> Snapshot:
        waits, hardware = self._waits_and_hardware()
        return Snapshot(self.ended or time.monotonic(), sum(waits.values()),
                        sum(hardware.values()))

    def add_time(self, suite: str, before: Snapshot, after: Snapshot) -> None:
        row = self.by_suite.setdefault(suite, [0.0, 0.0, 0.0])
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            row[i] += b - a

    def time_split(self) -> str:
        """Where the session's wall time went: waiting on the device, switching and flashing
        the rig's hardware, and the rest (framework, image preparation, test code)."""
        assert self.rig is not None and self.started is not None
        wall = (self.ended or time.monotonic()) - self.started
        waits, hardware = self._waits_and_hardware()
        device = sum(waits.values())
        rest = max(0.0, wall - device - sum(hardware.values()))

        def parts(d: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.1f}s" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

        return (f"time: {wall:.1f}s on the rig; waiting on the device {device:.1f}s "
                f"({100 * device / wall if wall else 0:.0f}%: {parts(waits) or 'none'}); "
                f"rig hardware {sum(hardware.values()):.1f}s ({parts(hardware) or 'none'}); "
                f"framework and test code {rest:.1f}s ({100 * rest / wall if wall else 0:.0f}%)")


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:3.0f}%" if whole else "  -"
