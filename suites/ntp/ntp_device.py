"""The NTP suite's view of the device: chrony's sources and tracking, the device clock, the
system log and config.json, through plain commands (``chronyc -c``, ``date``, ``jq``) that
balenaOS and the reference OS both have, so the suite runs unchanged on both."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from hil.dut import Dut
from hil.errors import InfraError
from hil.ntp import NtpServer

T = TypeVar("T")
CONFIG_JSON = "/mnt/boot/config.json"
POLL_EVERY = 2.0  # seconds between two looks at the device
APPLY_TIMEOUT = 60.0  # a config.json change reaches chrony
# chrony's own control to measure now rather than at its next poll (``chronyc burst good/max``):
# its requests go out 2 s apart, so a burst's work takes seconds, whatever the poll interval.
# The OS's configuration is untouched: selecting, stepping and giving up are chrony's own.
BURST_SYNC = "4/8"  # four answered samples let chrony select the source and step
BURST_LOST = "8/8"  # eight unanswered requests empty the reachability register
BURST_AGAIN = 8.0  # a burst is 4 answers 2 s apart; then ask again (a no-op mid-burst)
BURST_DEADLINE = 75.0  # what a wait driven by bursts may take, slow TCG boards included


# --- chrony as the device reports it -------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One line of ``chronyc -c -n sources``."""

    mode: str  # ^ server, = peer, # reference clock
    state: str  # * selected, + combined, - not combined, ? unusable, x falseticker, ~ jittery
    address: str
    stratum: int
    poll: int  # log2 seconds
    reach: int  # the 8-bit reachability register (one bit per poll)
    last_rx: int  # seconds since the last sample (4294967295: never)


@dataclass(frozen=True)
class Tracking:
    ref_id: str  # hex, e.g. 0A000202 for 10.0.2.2
    stratum: int
    leap: str  # "Normal", "Not synchronised", ...


@dataclass(frozen=True)
class ChronyView:
    sources: list[Source]
    tracking: Tracking | None
    device_time: int  # `date +%s` on the device
    host_time: float  # our clock in the middle of that command
    raw: str

    def source(self, address: str) -> Source | None:
        return next((s for s in self.sources if s.address == address), None)


def parse_sources(text: str) -> list[Source]:
    out = []
    for line in text.splitlines():
        f = line.strip().split(",")
        if len(f) >= 7 and f[0] in ("^", "=", "#"):
            out.append(Source(f[0], f[1], f[2], int(f[3]), int(f[4]), int(f[5], 8),
                              int(f[6])))
    return out


def parse_tracking(text: str) -> Tracking | None:
    for line in text.splitlines():
        f = line.strip().split(",")
        if len(f) >= 14 and len(f[0]) == 8:
            return Tracking(f[0].upper(), int(f[2]), f[-1])
    return None


def chrony_view(dut: Dut) -> ChronyView:
    """Sources, tracking and the device clock in one command (one round trip)."""
    t0 = time.time()
    r = dut.run("echo S; chronyc -c -n sources; echo T; chronyc -c tracking; echo D; date +%s",
                timeout=30)
    t1 = time.time()
    src, _, rest = r.stdout.partition("\nT\n")
    trk, _, dat = rest.partition("\nD\n")
    try:
        device_time = int(dat.strip().splitlines()[-1])
    except (ValueError, IndexError):
        device_time = 0
    return ChronyView(parse_sources(src), parse_tracking(trk), device_time, (t0 + t1) / 2,
                      r.stdout)


def ip_hex(address: str) -> str:
    return socket.inet_aton(address).hex().upper()


def expected_ip(host_address: str) -> str:
    """``chronyc -n`` shows addresses: the rig host's, as the DUT should resolve it."""
    try:
        return str(ipaddress.IPv4Address(host_address))
    except ValueError:
        return socket.gethostbyname(host_address)


# --- config.json on the device -------------------------------------------------------------------

def device_config(dut: Dut) -> dict[str, object]:
    return dict(dut.os.config_json())


def set_ntp_servers(dut: Dut, value: str | None) -> None:
    """Write ``ntpServers`` (None: remove it) the way users do; the OS re-applies config.json."""
    dut.os.set_config(ntpServers=value)


# --- the device and the rig's server together -----------------------------------------------------

@dataclass
class NtpRig:
    """What the NTP tests work with: the device, the server, the address the device uses."""

    dut: Dut
    server: NtpServer
    address: str  # the server's address as chronyc -n shows it on the device

    def view(self) -> ChronyView:
        return chrony_view(self.dut)

    def clock_error(self, v: ChronyView) -> float:
        """Device clock minus the server's time, seconds (the device clock has 1 s steps)."""
        return v.device_time - (v.host_time + self.server.offset)

    def synced(self, v: ChronyView, tolerance: float = 3.0) -> bool:
        src = v.source(self.address)
        return (src is not None and src.state == "*" and v.tracking is not None
                and v.tracking.leap == "Normal" and v.tracking.ref_id == ip_hex(self.address)
                and abs(self.clock_error(v)) <= tolerance)

    def unreachable(self, v: ChronyView) -> bool:
        src = v.source(self.address)
        return (src is not None and src.reach == 0 and src.state not in "*+"
                and not any(s.state in "*+" for s in v.sources))

    def describe(self, v: ChronyView) -> str:
        log = "\n".join(self.server.log_text().strip().splitlines()[-5:])
        return (f"device clock - server time = {self.clock_error(v):+.1f}s; {self.server!r}\n"
                f"--- device ---\n{v.raw.strip()}\n--- server log (tail) ---\n{log}")

    def burst(self, samples: str) -> str:
        """``chronyc burst`` for our source: chrony measures it now (``samples``: good/max).
        Returns what chronyc said when it refused: a chrony that does not answer is the
        device's to explain, so the wait goes on and its failure shows this."""
        r = self.dut.run(f"chronyc burst {samples} {self.address}", timeout=30)
        if r.exit_code == 0 and "200 OK" in r.stdout:
            return ""
        return (f"`chronyc burst {samples} {self.address}` refused (exit {r.exit_code}): "
                + (r.stdout + (r.stderr or "")).strip())

    def _wait(self, ok: Callable[[ChronyView], bool], promise: str, samples: str = "",
              timeout: float = BURST_DEADLINE) -> ChronyView:
        """Until ``ok`` holds; with ``samples``, asking chrony for a burst now and again."""
        last, refused, asked = [self.view()], [""], [0.0]
        if ok(last[0]):
            return last[0]

        def probe() -> ChronyView | None:
            self.server.check()  # a server that died is the rig's fault, not the device's
            if samples and time.monotonic() - asked[0] >= BURST_AGAIN:
                refused[0] = self.burst(samples)
                asked[0] = time.monotonic()
            last[0] = self.view()
            return last[0] if ok(last[0]) else None

        def seen() -> str:
            bursts = (f"(chrony asked for measurements, `chronyc burst {samples}`, every "
                      f"{BURST_AGAIN:.0f} s{'; ' + refused[0] if refused[0] else ''}) "
                      if samples else "")
            return bursts + self.describe(last[0])

        return self.dut.poll(probe, timeout, promise, seen, interval=POLL_EVERY)

    def wait_listed(self) -> ChronyView:
        """Until chrony carries our server at all (a config.json change takes a moment)."""
        return self._wait(lambda v: v.source(self.address) is not None,
                          "chrony on the device has the NTP server that config.json's "
                          f"ntpServers names ({self.address}) among its sources",
                          timeout=APPLY_TIMEOUT)

    def wait_synced(self, promise: str) -> ChronyView:
        self.wait_listed()
        return self._wait(self.synced, promise, BURST_SYNC)

    def wait_unreachable(self) -> ChronyView:
        return self._wait(self.unreachable,
                          f"with its NTP server {self.address} down, the device reports no "
                          "online source: chronyc shows it unreachable (^?, reach 0) and "
                          "selects nothing", BURST_LOST)

    def take_server_down(self) -> None:
        """The server stopped and the device seeing it unreachable (from a synchronised
        device, the server its only source); nothing to do when it is down already."""
        if self.server.running:
            self.wait_synced("precondition: the device is synchronised")
            self.require_only_source()
            self.server.stop()
            self.wait_unreachable()

    def require_only_source(self) -> None:
        """Tests that stop or shift the server need it to be the device's only time source."""
        others = [s for s in self.view().sources if s.address != self.address and s.reach]
        if others:
            raise InfraError("the DUT also reaches other NTP servers ("
                             + ", ".join(s.address for s in others) + "): the rig host must be "
                             "its only reachable time source (block UDP 123 elsewhere)",
                             part="network")
