"""An NTP server on the rig host, for the DUT to synchronise to: a real ``chronyd``.

Why chronyd and how:

- It runs in the foreground (``-d``) under ``Popen`` and is reaped by us: PID 1 on CI machines
  does not reap daemons, and a forked chronyd would outlive a killed session.
- ``-x``: it never touches the host's clock; ``-4``: IPv4 only (otherwise it also binds ``[::]``);
  ``cmdport 0`` plus a private Unix command socket: no clash with a host chronyd's ``:323``.
- **Offset control**: ``manual`` mode and ``chronyc settime``. With ``-x`` chronyd keeps its
  clock corrections in software, so after ``settime T`` every reply it sends (receive *and*
  transmit timestamps, both from its corrected clock) carries host time + offset, exactly like a
  server whose clock is wrong. Not ``faketime``: the kernel's receive timestamps that chrony uses
  would not be shifted, so replies would be inconsistent. Not a refclock: it needs a feeder
  thread and converges over several samples. The DUT's own clock is set wrong on the DUT
  (``date -s``) where that is the promise under test.
- **Port 123 is one per host**, and chronyd binds it with ``SO_REUSEPORT``: a second chronyd
  would silently share it and answer half of the DUT's requests. So: our sessions queue on a
  host-wide lock (the error names the holder); a foreign process holding the port is an
  ``InfraError`` naming its pid and command line; and while *stopped* we keep the port with a
  plain socket that answers nothing (no ``SO_REUSEPORT``: no other server can take the port
  meanwhile), so "server down" cannot be undone by someone else's server.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hil.cache import runtime_dir
from hil.deadline import Deadline
from hil.errors import InfraError
from hil.lock import HostLock

log = logging.getLogger(__name__)

NTP_EPOCH = 2208988800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01
QEMU_USER_NET_HOST = "10.0.2.2"  # QEMU user networking shows the host's loopback at this address


@dataclass(frozen=True)
class NtpReply:
    """One SNTP exchange. ``offset`` is server time minus our time (seconds)."""

    leap: int  # 0..2 normal, 3 = server unsynchronised
    stratum: int
    offset: float
    delay: float
    ref_id: str

    @property
    def synchronised(self) -> bool:
        return self.leap != 3 and 0 < self.stratum < 16


def _to_ntp(t: float) -> bytes:
    secs = int(t) + NTP_EPOCH
    frac = int((t % 1.0) * (1 << 32)) & 0xFFFFFFFF
    return struct.pack("!II", secs & 0xFFFFFFFF, frac)


def _from_ntp(data: bytes) -> float:
    secs, frac = struct.unpack("!II", data)
    return float(secs - NTP_EPOCH) + float(frac) / float(1 << 32)


def sntp_query(address: str, port: int = 123, timeout: float = 2.0) -> NtpReply | None:
    """Ask ``address:port`` for the time once (RFC 4330 client). None if nothing answers in
    ``timeout`` seconds (or the port is closed)."""
    packet = bytearray(48)
    packet[0] = (0 << 6) | (4 << 3) | 3  # LI 0, version 4, mode 3 (client)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        t1 = time.time()
        packet[40:48] = _to_ntp(t1)  # the server echoes it as "originate": matches our request
        try:
            sock.sendto(bytes(packet), (address, port))
            deadline = Deadline(timeout)
            while True:
                sock.settimeout(max(0.001, deadline.remaining()))
                data, _ = sock.recvfrom(512)
                t4 = time.time()
                if len(data) >= 48 and data[24:32] == bytes(packet[40:48]):
                    break
        except (TimeoutError, ConnectionRefusedError, OSError):
            return None
    t2, t3 = _from_ntp(data[32:40]), _from_ntp(data[40:48])
    ref = data[12:16]
    stratum = data[1]
    ref_id = (ref.rstrip(b"\0").decode("ascii", "replace") if stratum <= 1
              else socket.inet_ntoa(ref))
    return NtpReply(leap=data[0] >> 6, stratum=stratum, offset=((t2 - t1) + (t3 - t4)) / 2,
                    delay=(t4 - t1) - (t3 - t2), ref_id=ref_id)


# --- who holds a UDP port ---------------------------------------------------------------------

def _proc_net_udp() -> list[tuple[str, int, int]]:
    """(local IPv4 address or "::", port, socket inode) of every UDP socket on this host."""
    out: list[tuple[str, int, int]] = []
    for table, v6 in (("/proc/net/udp", False), ("/proc/net/udp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            addr_hex, port_hex = fields[1].split(":")
            if not v6:
                addr = socket.inet_ntoa(struct.pack("<I", int(addr_hex, 16)))
            elif int(addr_hex, 16) == 0:
                addr = "::"  # the IPv6 any address also takes IPv4 (dual stack)
            elif addr_hex.upper().startswith("0000000000000000FFFF0000"):  # ::ffff:a.b.c.d
                addr = socket.inet_ntoa(struct.pack("<I", int(addr_hex[24:], 16)))
            else:
                continue  # an IPv6-only address: no IPv4 datagram reaches it
            out.append((addr, int(port_hex, 16), int(fields[9])))
    return out


def _socket_owners(inodes: set[int]) -> dict[int, tuple[int, str]]:
    """inode -> (pid, command line) for the given socket inodes (needs root for others')."""
    owners: dict[int, tuple[int, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode in inodes and inode not in owners:
                        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
                        owners[inode] = (int(proc.name), cmd.decode(errors="replace")[:200])
        except OSError:
            continue  # the process went away, or is not ours to inspect
    return owners


def port_holders(address: str, port: int) -> list[tuple[int, str]]:
    """Processes with a UDP socket that would receive datagrams for ``address:port``:
    [(pid, command line)]; pid 0 when the owner cannot be found."""
    hits = {inode for addr, p, inode in _proc_net_udp()
            if p == port and (addr in ("0.0.0.0", "::", address) or address == "0.0.0.0")}
    owners = _socket_owners(hits)
    return sorted({owners.get(i, (0, "unknown process")) for i in hits})


def _describe(holders: list[tuple[int, str]]) -> str:
    return "; ".join(f"pid {pid} ({cmd})" if pid else cmd for pid, cmd in holders) or "nobody"


# --- the server ---------------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """End a daemon we started in the foreground: SIGTERM, then SIGKILL after ``grace``
    seconds; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def bind_address_for(host_address: str, port: int = 123) -> str:
    """Where to listen so that the DUT reaches us at ``host_address`` (the rig network's view of
    this host): QEMU user networking maps 10.0.2.2 to our loopback; on a bench, the address
    itself if it is one of ours, else every address."""
    if host_address == QEMU_USER_NET_HOST:
        return "127.0.0.1"
    try:
        ip = socket.gethostbyname(host_address)
    except OSError:
        return "0.0.0.0"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return "0.0.0.0"  # not an address of this host (NAT, a name for the router...)
    return ip


class NtpServer:
    """``chronyd`` serving time on ``address:port``, shifted by ``offset`` seconds.

    ``start()`` returns once it answers NTP queries as a synchronised server; ``stop()`` kills
    it and keeps the port silent; ``restart()`` brings it back with the same offset. Used as a
    context manager it starts and, on exit, stops and frees the port.
    """

    def __init__(self, address: str = "127.0.0.1", port: int = 123, *, offset: float = 0.0,
                 stratum: int = 8, lock_wait: float = 600.0, start_timeout: float = 20.0,
                 what: str = "pytest-hil NTP server", chronyd: str = "chronyd",
                 chronyc: str = "chronyc", rig: str = "") -> None:
        self.address, self.port, self.stratum = address, port, stratum
        self.lock_wait, self.start_timeout, self.what = lock_wait, start_timeout, what
        self.rig = rig  # the rig it serves, for the errors
        self.chronyd = shutil.which(chronyd) or chronyd
        self.chronyc = shutil.which(chronyc) or chronyc
        self._offset = float(offset)
        self._lock = HostLock(f"ntp-{address}-{port}", f"NTP port {address}:{port}", part="ntp")
        self._proc: subprocess.Popen[bytes] | None = None
        self._silent: socket.socket | None = None  # holds the port while stopped
        self._ignored = 0  # requests that reached the port while stopped
        self._workdir: Path | None = None
        self._logs: list[str] = []  # chronyd's output, one entry per run

    @classmethod
    def for_host_address(cls, host_address: str, port: int = 123, **kwargs: Any) -> NtpServer:
        """A server the DUT reaches at ``host_address`` (``rig.network.host_address``)."""
        return cls(bind_address_for(host_address, port), port, **kwargs)

    # --- state ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def offset(self) -> float:
        return self._offset

    @property
    def ignored_requests(self) -> int:
        """NTP requests that arrived while the server was stopped (and got no answer)."""
        self._drain()
        return self._ignored

    def log_text(self) -> str:
        """chronyd's own log, all runs of this server."""
        current = ""
        if self._workdir and (self._workdir / "chronyd.log").exists():
            current = (self._workdir / "chronyd.log").read_text(errors="replace")
        return "".join(self._logs) + current

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"NtpServer({self.address}:{self.port}, offset {self._offset:+.3f}s, {state})"

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self.running:
            return
        if self.port < 1024 and os.geteuid() != 0:
            raise InfraError(f"serving NTP on port {self.port} needs root", part="ntp")
        if shutil.which(self.chronyd) is None:
            raise InfraError("chronyd not found (apt-get install chrony)", part="ntp")
        if not self._lock.held:
            self._lock.acquire(self.lock_wait, self.what, on_wait=log.warning)
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="ntp-", dir=runtime_dir()))
        self._release_port()
        holders = port_holders(self.address, self.port)
        if holders:
            raise InfraError(f"UDP {self.address}:{self.port} is already served by "
                             f"{_describe(holders)}: stop it, or the DUT may get its time "
                             "from there", part="ntp")
        conf = self._write_config(self._workdir)
        logfile = (self._workdir / "chronyd.log").open("ab")
        user = pwd.getpwuid(os.geteuid()).pw_name
        # -d: foreground, so we reap it; -x: never touch the host clock; -4: no [::] socket
        self._proc = subprocess.Popen(
            [self.chronyd, "-d", "-x", "-4", "-u", user, "-f", str(conf)],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            start_new_session=True)
        logfile.close()
        try:
            self._wait_serving()
            if self._offset:
                self._apply_offset(self._offset)
        except BaseException:
            self._kill()
            raise
        log.info("%r serving", self)

    def check(self) -> None:
        """Raise if the server died under us (started, and not stopped since): a wait for the
        device to keep time from it would otherwise blame the device. A rig fault."""
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"the rig host's NTP server (chronyd, pid {proc.pid}, "
                             f"{self.address}:{self.port}) died with status {proc.returncode}"
                             f"\n--- chronyd log ---\n{self.log_text()[-3000:]}", part="ntp",
                             rig=self.rig)

    def stop(self) -> None:
        """Kill the server; the port stays ours and silent until ``start()``."""
        self._kill()
        if self._lock.held and self._silent is None:
            self._hold_port()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self._kill()
        self._release_port()
        self._lock.release()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> NtpServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- offset -----------------------------------------------------------------------------
    def set_offset(self, seconds: float, tolerance: float = 0.25, timeout: float = 30.0) -> None:
        """Serve host time + ``seconds`` from now on (at once if running, else from
        ``start()``). Checked by querying the server: within ``tolerance`` seconds."""
        self._offset = float(seconds)
        if self.running:
            self._apply_offset(self._offset, tolerance, timeout)

    def measure_offset(self, samples: int = 3, timeout: float = 10.0) -> float:
        """The offset the server really serves, from SNTP queries (median)."""
        deadline = Deadline(timeout)
        got: list[NtpReply] = []
        while len(got) < samples and not deadline.expired():
            reply = sntp_query(self._query_address(), self.port,
                               timeout=min(2.0, max(0.1, deadline.remaining())))
            if reply is not None:
                got.append(reply)
        if not got:
            raise InfraError(f"{self!r} does not answer NTP queries in {timeout:.0f}s\n"
                             f"--- chronyd log ---\n{self.log_text()[-3000:]}", part="ntp")
        # the exchange with the lowest round trip is the most accurate one
        return min(got, key=lambda r: r.delay).offset

    def check_exclusive(self) -> None:
        """Raise if any process but ours receives datagrams for our port."""
        ours = {self.pid} if self.running else {os.getpid()}
        others = [h for h in port_holders(self.address, self.port) if h[0] not in ours]
        if others:
            raise InfraError(f"another process also serves UDP {self.address}:{self.port}: "
                             f"{_describe(others)}", part="ntp")

    # --- internals --------------------------------------------------------------------------
    def _query_address(self) -> str:
        return "127.0.0.1" if self.address == "0.0.0.0" else self.address

    def _chronyc_socket(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "chronyd.sock"

    def _write_config(self, folder: Path) -> Path:
        conf = folder / "chronyd.conf"
        conf.write_text(
            "# pytest-hil NTP server (hil/ntp.py)\n"
            f"local stratum {self.stratum}\n"  # serve our clock as a synchronised server
            "manual\n"  # enables `chronyc settime`: the offset control
            "allow all\n"
            f"bindaddress {self.address}\n"
            f"port {self.port}\n"
            "cmdport 0\n"  # no UDP command port: a host chronyd may have :323
            f"bindcmdaddress {self._chronyc_socket()}\n"
            f"pidfile {folder / 'chronyd.pid'}\n")
        return conf

    def _wait_serving(self) -> None:
        assert self._proc is not None
        deadline = Deadline(self.start_timeout)
        last: NtpReply | None = None
        while not deadline.expired():
            if self._proc.poll() is not None:
                raise InfraError(f"chronyd exited with status {self._proc.returncode} at start"
                                 f"\n--- chronyd log ---\n{self.log_text()[-3000:]}", part="ntp")
            last = sntp_query(self._query_address(), self.port,
                              timeout=min(1.0, max(0.05, deadline.remaining())))
            if last is not None and last.synchronised and last.stratum == self.stratum:
                others = [h for h in port_holders(self.address, self.port)
                          if h[0] != self._proc.pid]
                if others:  # chronyd shares the port (SO_REUSEPORT): not ours alone
                    raise InfraError(f"UDP {self.address}:{self.port} is also served by "
                                     f"{_describe(others)}", part="ntp")
                return
            if last is None:
                time.sleep(min(0.05, deadline.remaining()))  # not listening yet
        seen = (f"reply leap={last.leap} stratum={last.stratum}" if last else "no reply")
        raise InfraError(f"chronyd did not serve {self.address}:{self.port} as a stratum "
                         f"{self.stratum} server within {self.start_timeout:.0f}s; saw: {seen}"
                         f"\n--- chronyd log ---\n{self.log_text()[-3000:]}", part="ntp")

    def _apply_offset(self, seconds: float, tolerance: float = 0.25,
                      timeout: float = 30.0) -> None:
        """``settime`` takes whole seconds: send it on a second boundary of the target clock,
        through an already started chronyc, so the fraction lost is only the socket hop."""
        deadline = Deadline(timeout)
        measured = float("nan")
        while not deadline.expired():
            chronyc = subprocess.Popen(
                [self.chronyc, "-h", str(self._chronyc_socket())], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "TZ": "UTC"})
            assert chronyc.stdin is not None
            target = time.time() + seconds
            lead = 0.003  # chronyc's hop to chronyd
            wait = (1.0 - (target % 1.0) - lead) % 1.0
            time.sleep(wait)  # align to the target clock's next whole second, < 1 s
            when = time.strftime("%Y-%m-%d %H:%M:%S",
                                 time.gmtime(round(time.time() + seconds + lead)))
            # "manual reset" first: old samples would make chronyd infer a frequency error
            try:
                out, _ = chronyc.communicate(f"manual reset\nsettime {when}\n".encode(),
                                             timeout=max(1.0, deadline.remaining()))
            except subprocess.TimeoutExpired:
                chronyc.kill()
                chronyc.wait()
                break
            text = out.decode(errors="replace")
            if "200 OK" not in text and "Clock was" not in text:
                raise InfraError(f"chronyc settime failed: {text.strip()}", part="ntp")
            measured = self.measure_offset(timeout=max(1.0, min(10.0, deadline.remaining())))
            if abs(measured - seconds) <= tolerance:
                log.info("%r: offset measured %+.3fs", self, measured)
                return
            log.info("NTP server offset %+.3fs, wanted %+.3fs: again", measured, seconds)
        raise InfraError(f"could not set the NTP server's offset to {seconds:+.3f}s within "
                         f"{timeout:.0f}s (±{tolerance}s); last measured {measured:+.3f}s",
                         part="ntp")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc)
        if self._workdir and (self._workdir / "chronyd.log").exists():
            path = self._workdir / "chronyd.log"
            self._logs.append(path.read_text(errors="replace"))
            path.unlink()

    def _hold_port(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.address, self.port))  # no SO_REUSEPORT: nobody can join
        except OSError as exc:
            sock.close()
            holders = port_holders(self.address, self.port)
            raise InfraError(f"cannot keep UDP {self.address}:{self.port} silent while the "
                             f"server is down ({exc.strerror}); held by {_describe(holders)}",
                             part="ntp") from None
        sock.setblocking(False)
        self._silent = sock
        self._ignored = 0

    def _drain(self) -> None:
        if self._silent is None:
            return
        while True:
            try:
                self._silent.recv(512)
            except (BlockingIOError, OSError):
                return
            self._ignored += 1

    def _release_port(self) -> None:
        if self._silent is not None:
            self._drain()
            self._silent.close()
            self._silent = None
