"""An emulated bench, built from a rig file's ``emulator:`` section and the rig's own parts.

The rig's parts stay what a real bench has (a serial relay on a tty, a console at an
``rfc2217://`` URL, pdudaemon at an HTTP URL, a virtual SD mux); the emulator provides the
hardware behind them at those very addresses, so the drivers under test are the bench's:

- ``relay:``   an LCUS relay board on a pty at the ``power:`` part's ``port``
- ``pdu:``     pdudaemon (for real) at the ``power:`` part's ``url``, its ``localcmdline``
               outlet wired to the board
- ``console:`` the board's UART on a pty (a USB-serial adapter) behind ser2net at the
               ``console:`` part's ``rfc2217://`` port
- ``board:``   the QEMU machine (the same settings as ``target: {driver: qemu}``); its disk is
               the virtual SD mux's card when the rig has ``sd_mux: {driver: virtual}``

Relative paths are in the rig's runtime directory, which must be the one the rig's drivers get
(``PartContext.runtime``). Its control socket there, ``emu.sock``, also takes faults from tests
in other processes: ``python -m hil.emu.ctl RUNTIME/emu.sock relay mute`` (``unmute``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.parse
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from hil.config import RigConfig
from hil.console.serial import SerialSettings
from hil.emu.board import EmulatedBoard
from hil.emu.ctl import ControlServer
from hil.emu.pdu import PduDaemonRunner, ctl_command
from hil.emu.relay import RelayBoard
from hil.emu.ser2net import Ser2Net
from hil.emu.settings import EmulatorSettings
from hil.errors import ConfigError, InfraError
from hil.mux.virtual import VirtualMuxSettings, card_paths, loops_backing
from hil.network import SshNetworkSettings
from hil.power import Normally
from hil.power.pdudaemon import PduDaemonSettings
from hil.power.serial_relay import SerialRelaySettings

log = logging.getLogger(__name__)


def running_elsewhere(runtime: Path) -> int | None:
    """The pid of another live process serving this runtime directory's bench, if any."""
    try:
        pid = int((runtime / "emulator.pid").read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


S = TypeVar("S", bound=BaseModel)


def _part(rig: RigConfig, part: str, driver: str, settings: type[S]) -> S | None:
    """The settings of the rig's ``part`` if it has that driver, else None."""
    cfg = rig.parts.get(part)
    if cfg is None or cfg.driver != driver or not isinstance(cfg.settings, settings):
        return None
    return cfg.settings


def _settings(rig: RigConfig, part: str, driver: str, settings: type[S]) -> S:
    found = _part(rig, part, driver, settings)
    if found is None:
        raise ConfigError(f"emulating this needs {part}: {{driver: {driver}}} in the rig",
                          file=str(rig.source), key=f"emulator.{part}")
    return found


def _path(runtime: Path, value: str | Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else runtime / p


class Bench:
    def __init__(self, rig: RigConfig, runtime: Path) -> None:
        self.settings = rig.emulator or EmulatorSettings()  # validated when the rig file loaded
        self.rig, self.runtime = rig, runtime
        runtime.mkdir(parents=True, exist_ok=True)
        s = self.settings
        card = None
        card_size = 2 * 1024**3
        mux = _part(rig, "sd_mux", "virtual", VirtualMuxSettings)
        if mux is not None:
            card = card_paths(mux, runtime)
            card_size = mux.size
        net = _part(rig, "network", "ssh", SshNetworkSettings)
        ssh_port = net.port if net is not None else None
        uart_link = _path(runtime, s.console.tty if s.console else "console-tty")
        internal = None
        if s.internal_disk is not None:
            internal = (_path(runtime, s.internal_disk.image), s.internal_disk.size)
        self.board = EmulatedBoard(s.board, rig=rig.name, runtime=runtime,
                                   device_type=rig.device_type, uart_link=uart_link, card=card,
                                   card_size=card_size, ssh_port=ssh_port, internal=internal)
        self.has_board = s.has_board
        self.relay: RelayBoard | None = None
        self.relay_channel = 1
        self.relay_normally: Normally = "open"
        if s.relay is not None:
            power = _settings(rig, "power", "serial-relay", SerialRelaySettings)
            if power.port is None or "://" in power.port:
                raise ConfigError("the emulated relay needs power.port to be a tty path",
                                  file=str(rig.source), key="power.port")
            self.relay_channel = power.channel
            self.relay_normally = s.relay.normally or power.normally
            if power.channel > s.relay.channels:
                raise ConfigError(f"power.channel {power.channel} is not on the emulated "
                                  f"{s.relay.channels}-channel board", file=str(rig.source),
                                  key="emulator.relay.channels")
            self.relay = RelayBoard(_path(runtime, power.port), channels=s.relay.channels,
                                    status=s.relay.status, on_change=self._relay_changed)
        # pdudaemon's outlet commands, and faults for the tests (`python -m hil.emu.ctl`)
        self.ctl = ControlServer(runtime / "emu.sock", self._control)
        self.pdu: PduDaemonRunner | None = None
        self.pdu_outlet = ""
        if s.pdu is not None:
            pdu_power = _settings(rig, "power", "pdudaemon", PduDaemonSettings)
            # the settings have a hostname unless they have an alias
            if pdu_power.alias is not None or pdu_power.hostname is None:
                raise ConfigError("the emulated pdudaemon needs hostname and port, not alias",
                                  file=str(rig.source), key="power.alias")
            url = urllib.parse.urlsplit(pdu_power.url)
            self.pdu_outlet = str(pdu_power.port)
            sock = self.ctl.path
            self.pdu = PduDaemonRunner(runtime, {pdu_power.hostname: {
                "cmd_on": ctl_command(sock, "outlet", "OUTLET", "on"),
                "cmd_off": ctl_command(sock, "outlet", "OUTLET", "off")}},
                host=url.hostname or "127.0.0.1", port=url.port or 16421, rig=rig.name)
        self.ser2net: Ser2Net | None = None
        if s.console is not None:
            console = _settings(rig, "console", "serial", SerialSettings)
            url = urllib.parse.urlsplit(console.url or "")
            if url.scheme != "rfc2217" or url.port is None:
                raise ConfigError("the emulated console is exported by ser2net: console.url "
                                  "must be rfc2217://127.0.0.1:PORT?ign_set_control",
                                  file=str(rig.source), key="console.url")
            baud = console.baud or rig.device_type.console.baud
            self.ser2net = Ser2Net(runtime, uart_link, url.port, host=url.hostname or
                                   "127.0.0.1", baud=baud, rig=rig.name)
        self._stack = contextlib.ExitStack()

    # --- the wiring ------------------------------------------------------------------------------
    def _relay_changed(self, channel: int, energised: bool) -> None:
        if self.relay is not None and channel == self.relay_channel:
            self.board.set_input("relay", self.relay.contact_closed(channel,
                                                                     self.relay_normally))

    def _control(self, words: list[str]) -> str:
        """``outlet N on|off`` (pdudaemon's commands); the faults a lab meets:
        ``ser2net stop|start`` (the console's server vanishes, comes back), ``relay
        mute|unmute`` (the relay board's MCU hangs: it ignores every command)."""
        if len(words) == 3 and words[0] == "outlet" and words[2] in ("on", "off"):
            if words[1] == self.pdu_outlet:
                self.board.set_input("pdu", words[2] == "on")
            return "ok"  # other outlets of the PDU feed nothing
        if words == ["ser2net", "stop"] and self.ser2net is not None:
            self.ser2net.stop()
            return "ok"
        if words == ["ser2net", "start"] and self.ser2net is not None:
            self.ser2net.start()
            return "ok"
        if len(words) == 2 and words[0] == "relay" and words[1] in ("mute", "unmute") and \
                self.relay is not None:
            self.relay.mute = words[1] == "mute"
            return "ok"
        raise ValueError(f"unknown request {' '.join(words)!r}")

    # --- lifecycle -------------------------------------------------------------------------------
    def _remove_card_reader(self) -> None:
        """The bench goes away with its card reader: no loop device outlives it."""
        if not self.has_board or self.board.card is None:
            return
        import subprocess

        for loop in loops_backing(self.board.card[0]):
            subprocess.run(["losetup", "-d", str(loop)], capture_output=True, check=False)

    @property
    def pid_file(self) -> Path:
        return self.runtime / "emulator.pid"

    def _drop_pid_file(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if int(self.pid_file.read_text()) == os.getpid():
                self.pid_file.unlink()

    def start(self) -> Bench:
        other = running_elsewhere(self.runtime)
        if other is not None:
            raise InfraError(f"the emulated hardware of this rig already runs (pid {other}, "
                             f"{self.runtime})", part="emulator", rig=self.rig.name)
        try:
            self.pid_file.write_text(f"{os.getpid()}\n")
            self._stack.callback(self._drop_pid_file)
            if self.settings.libvirtd:
                from hil.emu import libvirtd

                self._stack.enter_context(libvirtd.running(self.runtime / "libvirtd"))
            if not self.has_board:
                return self
            self._stack.callback(self._remove_card_reader)
            self._stack.callback(self.board.stop)
            self.board.start()
            if self.relay is not None:
                self.board.inputs["relay"] = self.relay.contact_closed(self.relay_channel,
                                                                       self.relay_normally)
                self._stack.callback(self.relay.stop)
                self.relay.start()
            self._stack.callback(self.ctl.stop)
            self.ctl.start()
            if self.pdu is not None:
                self.board.inputs["pdu"] = False
                self._stack.callback(self.pdu.stop)
                self.pdu.start()
            if self.ser2net is not None:
                self._stack.callback(self.ser2net.stop)
                self.ser2net.start()
            # the bench's mains: an NC-wired board (or one without a switch) starts now
            self.board.set_input("bench", True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops everything started, in reverse order; safe to call twice."""
        self._stack.close()

    def __enter__(self) -> Bench:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> list[str]:
        lines = [f"runtime directory: {self.runtime}"]
        if self.settings.libvirtd:
            lines.append("libvirtd: qemu:///system")
        if not self.has_board:
            return lines
        if self.relay is not None:
            lines.append(f"relay board (LCUS, {self.relay.channels} ch, status "
                         f"{self.relay.status}): {self.relay.link}; the board hangs on channel "
                         f"{self.relay_channel}, normally {self.relay_normally}")
        if self.pdu is not None:
            lines.append(f"pdudaemon: {self.pdu.url}, the board on outlet {self.pdu_outlet}")
        if self.ser2net is not None:
            lines.append(f"console: {self.ser2net.url} (tty {self.board.uart.port.link})")
        if self.board.card is not None:
            lines.append(f"SD card: {self.board.card[0]} (mux position in "
                         f"{self.board.card[1].name})")
        if self.board.internal is not None:
            lines.append(f"internal disk: {self.board.internal[0]}")
        lines.append(f"board log: {self.runtime / 'board' / 'qemu.log'}")
        return lines
