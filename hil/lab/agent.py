"""``hil lab agent``: a bench host that serves its rigs to the lab.

It registers the host's rigs and keeps the host in scheduling (the bench-host loop of
``hil.lab.host``, one way to do it), and it serves each rig's parts to remote sessions with the
daemons the drivers already speak:

- the console: ser2net exporting the rig's tty as RFC 2217 (``rfc2217://ADDRESS:PORT``),
- power: pdudaemon, whose one PDU is named after the rig and the lease's epoch
  (``RIG.leaseN``, outlet 1): a request with a stale epoch names a PDU that does not exist
  and is refused (HTTP 500); each switch runs the rig's own power driver here, after the lab
  database confirmed that epoch is the rig's live lease,
- SSH to the board: a TCP forward to the rig's ``network:`` address,
- the SD mux and flashing: through this host's SSH server, where a session runs ``hil lab mux``
  and ``hil lab flash`` (``hil.lab.benchops``), which ask this agent (its control socket) to
  check the lease's epoch against the lab database and to drive the rig's own mux and storage;
  the image is written here by ``hil.flash.writer``.

What it registers for each rig is an ordinary rig file pointing at those endpoints (written to
``$HIL_RUNTIME_DIR/lab/served/RIG.yaml``), so a session runs the same drivers remotely as
locally. The endpoints exist only while a lease on the rig is live: when it ends (released,
expired, kicked) the agent stops the rig's ser2net, pdudaemon and forward, which cuts the
session's connections, then cleans the rig through its local drivers (power off, the mux
off, as a session's end).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hil.cache import runtime_dir
from hil.config import RigConfig, load_rig
from hil.console.serial import SerialSettings
from hil.emu.ctl import ControlServer
from hil.emu.pdu import PduDaemonRunner, ctl_command
from hil.emu.ser2net import Ser2Net
from hil.errors import ConfigError, InfraError
from hil.lab import db, host
from hil.lab.benchops import AGENT_ENV
from hil.lab.checks import Checker, Policy
from hil.lab.forward import Forward
from hil.lab.leases import Grant
from hil.lab.rigs import LEASE_EPOCH, register
from hil.lock import RigLock
from hil.network import SshNetworkSettings
from hil.registry import PARTS
from hil.rig import Rig

log = logging.getLogger(__name__)
PART = "lab agent"


@dataclass(frozen=True)
class Ports:
    """Where the agent serves: its address as the lab reaches it, and the first of three TCP
    ports per rig (console, pdudaemon, SSH; rigs in name order)."""

    address: str
    base: int = 7400

    def of(self, index: int) -> tuple[int, int, int]:
        return self.base + 3 * index, self.base + 3 * index + 1, self.base + 3 * index + 2


@dataclass(frozen=True)
class SshAccess:
    """How sessions reach this host's SSH server, to switch a rig's SD mux and flash it: the
    lab's login here, the port, and the host's public key line (sessions check it)."""

    user: str
    port: int = 22
    host_key: str | None = None

    def part(self, address: str, rig: str, control: Path) -> dict[str, Any]:
        """The ``{driver: lab}`` settings of a served rig's sd_mux and storage. Their command
        runs this agent's ``hil lab`` (its Python, its import path) with its control socket."""
        env = [f"{AGENT_ENV}={control}"] + (
            [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
        out: dict[str, Any] = {
            "driver": "lab", "host": address, "port": self.port, "user": self.user,
            "command": shlex.join(["env", *env, sys.executable, "-m", "hil.cli", "lab"]),
            "rig": rig, "epoch": LEASE_EPOCH}
        if self.host_key:
            out["host_key"] = self.host_key
        return out


def _console_tty(cfg: RigConfig, runtime: Path) -> Path | None:
    """The rig's console as a tty on this host (``console.url`` a path, relative to the rig's
    runtime directory as the emulated board's UART is; or ``console.match``), or None when
    the rig file does not say (resolved by udev when a lease starts)."""
    spec = cfg.parts.get("console")
    if spec is None or spec.driver != "serial" or not isinstance(spec.settings, SerialSettings):
        raise ConfigError("a served rig needs console: {driver: serial} on a tty of this host",
                          file=str(cfg.source), key="console")
    url = spec.settings.url
    if url is None:
        return None
    if "://" in url:
        raise ConfigError(f"a served rig's console must be a tty of this host (a path, or "
                          f"match:), not {url!r}: the agent exports it with ser2net",
                          file=str(cfg.source), key="console.url")
    path = Path(url)
    return path if path.is_absolute() else runtime / path


def _check(cfg: RigConfig) -> None:
    if "target" in cfg.parts:
        raise ConfigError("a whole virtual board (target:) is not served by the agent: give "
                          "it power: and console: parts", file=str(cfg.source), key="target")
    _console_tty(cfg, Path())


def servable(path: str | Path) -> bool:
    """Whether the agent can serve this rig file (else the reason is logged)."""
    try:
        _check(load_rig(str(path)))
    except ConfigError as exc:
        log.info("not serving %s: %s", path, exc)
        return False
    return True


class ServedRig:
    """One rig of this host: its local parts, its endpoints while a lease is live."""

    def __init__(self, cfg: RigConfig, index: int, ports: Ports, host_name: str,
                 control: Path, ssh: SshAccess | None = None) -> None:
        _check(cfg)
        self.cfg, self.name = cfg, cfg.name
        self.runtime = runtime_dir("rigs", cfg.name)  # the local drivers' (as a session's)
        self.served = runtime_dir("lab", "served", cfg.name)  # the agent's own files
        self.tty = _console_tty(cfg, self.runtime)
        net = cfg.parts.get("network")
        self.network = net.settings if net is not None and isinstance(
            net.settings, SshNetworkSettings) else None
        self.console_port, self.pdu_port, self.ssh_port = ports.of(index)
        self.ports, self.host_name, self.control = ports, host_name, control
        # the SD mux and flashing: served over SSH when the rig has both here
        self.ssh = ssh if {"sd_mux", "storage"} <= set(cfg.parts) else None
        self.rig: Rig | None = None  # the local parts, once started
        self.epoch: int | None = None  # the lease whose endpoints are open
        self.expires: float = 0.0  # monotonic: when that lease runs out unless renewed
        self.ser2net: Ser2Net | None = None
        self.pdudaemon: PduDaemonRunner | None = None
        self.forward: Forward | None = None
        self.lock = threading.Lock()  # one operation on the local parts at a time
        self.guard = threading.RLock()  # the endpoints: the loop and pdudaemon's switches
        self.faulted: int | None = None  # a lease whose rig failed here: not served again

    # --- the rig file the lab hands out -----------------------------------------------------
    def remote_config(self) -> str:
        """The rig file registered for this rig: the local one's settings, its parts replaced
        by this host's endpoints; the lease's epoch names its PDU."""
        raw: dict[str, Any] = yaml.safe_load(self.cfg.source.read_text(encoding="utf-8"))
        out = {k: v for k, v in raw.items() if k not in (*PARTS, "emulator")}
        out["description"] = (f"{self.cfg.description} - served by the lab agent of "
                              f"{self.host_name}").lstrip(" -")
        out["power"] = {"driver": "pdudaemon", "port": 1,
                        "url": f"http://{self.ports.address}:{self.pdu_port}",
                        "hostname": self.pdu_name(LEASE_EPOCH)}
        # reconnect 0: a served console drops when its lease ends, and the next lease's
        # ser2net listens on the same port; a stale session must not reopen into it
        out["console"] = {"driver": "serial", "baud": self.baud, "reconnect": 0, "url":
                          f"rfc2217://{self.ports.address}:{self.console_port}?ign_set_control"}
        if self.network is not None:
            out["network"] = {"driver": "ssh", "host": self.ports.address, "port": self.ssh_port,
                              "host_address": self.network.host_address}
        if self.ssh is not None:
            out["sd_mux"] = out["storage"] = self.ssh.part(self.ports.address, self.name,
                                                           self.control)
        head = (f"# {self.name} as the lab reaches it: served by `hil lab agent "
                f"{self.host_name}` (generated; edit {self.cfg.source.name} on the bench host)\n")
        return head + yaml.safe_dump(out, sort_keys=False)

    def write_remote_config(self) -> Path:
        path = runtime_dir("lab", "served") / f"{self.name}.yaml"
        path.write_text(self.remote_config(), encoding="utf-8")
        return path

    def pdu_name(self, epoch: int | str) -> str:
        return f"{self.name}.lease{epoch}"

    # --- endpoints --------------------------------------------------------------------------
    def open(self, epoch: int, expires_in: float) -> None:
        """Serve power, the console and SSH for lease ``epoch``."""
        self.epoch, self.expires = epoch, time.monotonic() + expires_in
        tty = self.tty
        if tty is None:
            assert self.rig is not None
            tty = Path(self.rig.console.url)  # found by udev from console.match
        switch = {f"cmd_{a}": ctl_command(self.control, "power", self.name, str(epoch),
                                          "OUTLET", a) for a in ("on", "off")}
        try:
            # pdudaemon first: a session attaches the console (retrying while ser2net starts)
            # before its first power switch
            self.pdudaemon = PduDaemonRunner(self.served, {self.pdu_name(epoch): switch},
                                             host=self.ports.address, port=self.pdu_port,
                                             rig=self.name, part="power").start()
            self.ser2net = Ser2Net(self.served, tty, self.console_port,
                                   host=self.ports.address, baud=self.baud, rig=self.name,
                                   part="console").start()
            if self.network is not None:
                self.forward = Forward((self.ports.address, self.ssh_port),
                                       (self.network.host, self.network.port), self.served,
                                       rig=self.name).start()
        except InfraError:
            self.close()
            raise
        log.info("%s: serving lease epoch %d: console %s, pdudaemon %s, ssh %s:%d", self.name,
                 epoch, self.ser2net.url, self.pdudaemon.url, self.ports.address, self.ssh_port)

    @property
    def baud(self) -> int:
        spec = self.cfg.parts["console"].settings
        if isinstance(spec, SerialSettings) and spec.baud:
            return spec.baud
        return self.cfg.device_type.console.baud

    def fault(self, epoch: int) -> None:
        """The rig failed under lease ``epoch`` (its power switch here): cut the session off
        at once, so it meets an infrastructure error (its console lost, pdudaemon gone) rather
        than waiting for a boot that cannot come."""
        with self.guard:
            if self.epoch == epoch:
                self.faulted = epoch
                self._close(grace=0)  # pdudaemon would answer the failed switch with 200

    def close(self) -> None:
        """Stop serving: the ports close, the console's client and SSH connections are cut."""
        with self.guard:
            self._close()

    def _close(self, grace: float = 0.5) -> None:
        epoch, self.epoch = self.epoch, None
        if self.ser2net is not None:
            self.ser2net.stop()
            self.ser2net = None
        if self.pdudaemon is not None:
            self.pdudaemon.stop(grace)
            self.pdudaemon = None
        if self.forward is not None:
            self.forward.close()
            self.forward = None
        if epoch is not None:
            log.info("%s: lease epoch %d ended: its endpoints are closed", self.name, epoch)

    # --- the local parts --------------------------------------------------------------------
    def power(self, on: bool) -> None:
        assert self.rig is not None
        with self.lock:
            (self.rig.power.on if on else self.rig.power.off)()

    def clean(self) -> None:
        """After a lease: power off and the mux off, as a session's end leaves a local rig (the
        next session gives the card to the board, flashed or not)."""
        assert self.rig is not None
        with self.lock:
            self.rig.power.off()
            if self.rig.sd_mux is not None:
                self.rig.sd_mux.off()

    def mux(self, position: str) -> None:
        assert self.rig is not None
        if self.rig.sd_mux is None:
            raise ValueError(f"{self.name} has no sd_mux")
        with self.lock:
            {"host": self.rig.sd_mux.to_host, "dut": self.rig.sd_mux.to_dut,
             "off": self.rig.sd_mux.off}[position]()

    def mux_state(self) -> str:
        """"host", "dut", "off", or "unknown" where the mux cannot report."""
        assert self.rig is not None
        if self.rig.sd_mux is None:
            raise ValueError(f"{self.name} has no sd_mux")
        with self.lock:
            return self.rig.sd_mux.state() or "unknown"

    def storage(self) -> str:
        """The card's block device or file, once the host sees it: "fixed|removable PATH"."""
        assert self.rig is not None
        if self.rig.storage is None:
            raise ValueError(f"{self.name} has no storage")
        with self.lock:
            target = self.rig.storage.target(self.cfg.timeouts.mux)
        return f"{'fixed' if self.rig.storage.fixed else 'removable'} {target}"


class Agent:
    def __init__(self, dsn: str, name: str, rig_files: Sequence[str], ports: Ports, *,
                 labels: Sequence[str] = (), interval: float = 10.0,
                 checks: Policy | None = None, ssh: SshAccess | None = None) -> None:
        self.dsn, self.name, self.ports = dsn, name, ports
        self.labels, self.interval, self.checks = list(labels), interval, checks
        configs = sorted((load_rig(f) for f in rig_files), key=lambda c: c.name)
        self.sock = runtime_dir("lab") / f"agent-{name}.sock"
        self.rigs = {c.name: ServedRig(c, i, ports, name, self.sock, ssh)
                     for i, c in enumerate(configs)}
        self.stack = contextlib.ExitStack()

    def start(self) -> Agent:
        """Lock and start every rig (its emulated hardware too), then register them."""
        try:
            for served in self.rigs.values():
                lock = RigLock(served.name)
                lock.acquire(0, f"hil lab agent {self.name}")
                self.stack.callback(lock.release)
                if served.cfg.emulator:
                    emu = importlib.import_module("hil.emu")
                    self.stack.enter_context(emu.start(served.cfg, served.runtime))
                served.rig = Rig(served.cfg, served.runtime)
                self.stack.callback(served.rig.close)
                self.stack.callback(served.close)
                served.clean()  # whatever it was doing before the agent started
            ctl = ControlServer(self.sock, self._control).start()
            self.stack.callback(ctl.stop)
            files = [str(r.write_remote_config()) for r in self.rigs.values()]
            with db.connect(self.dsn) as conn:
                register(conn, self.name, files, self.labels, host_timeout=3 * self.interval)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.stack.close()

    def run(self, stop: threading.Event | None = None) -> None:
        checker = Checker(self.dsn, self.name, self.checks) if self.checks else None

        def each_pass(conn: db.Connection | None) -> None:
            self.sync(conn)  # first: a check's lease is served before its command runs
            if checker is not None:
                checker(conn)

        try:
            host.serve(self.dsn, self.name, self._clean, interval=self.interval, stop=stop,
                       each_pass=each_pass)
        finally:
            if checker is not None:
                checker.stop()

    # --- following the leases -----------------------------------------------------------------
    def sync(self, conn: db.Connection | None) -> None:
        """Open each rig's endpoints for its live lease, close those of leases that ended. With
        no database (``conn`` None), a lease is trusted until its known expiry, as its holder
        keeps it through a renewal that fails."""
        live: dict[str, tuple[int, float]] = {}
        if conn is not None:
            rows = conn.execute(
                "SELECT rig, epoch, extract(epoch FROM least(expires_at, hard_cap_at) - now()) "
                "AS left FROM leases WHERE ended_at IS NULL AND expires_at > now() "
                "AND hard_cap_at > now() AND rig = ANY(%s)", (list(self.rigs),)).fetchall()
            live = {str(r["rig"]): (int(r["epoch"]), float(r["left"])) for r in rows}
        for served in self.rigs.values():
            with served.guard:
                opened = self._follow(served, live.get(served.name), conn is not None)
            if opened is not None and conn is not None:
                # the session waits for this before it touches the rig (leases.wait_served)
                conn.execute("UPDATE leases SET served_at = now(), serve_error = %s "
                             "WHERE rig = %s AND epoch = %s", (opened[1], served.name, opened[0]))
                conn.execute("NOTIFY hil_lab")

    @staticmethod
    def _follow(served: ServedRig, want: tuple[int, float] | None,
                known: bool) -> tuple[int, str | None] | None:
        """Open or close the rig's endpoints as its live lease says; returns the epoch it
        opened them for (and why it could not) when it tried."""
        if not known:
            if served.epoch is not None and time.monotonic() > served.expires:
                served.close()
            return None
        if want is not None and want[0] == served.epoch:
            served.expires = time.monotonic() + want[1]
            return None
        served.close()
        if want is None or want[0] == served.faulted:
            return None
        try:
            served.open(*want)
        except InfraError as exc:  # the session is told, and meets a closed port: INFRA
            served.faulted = want[0]
            log.error("%s: cannot serve lease epoch %d: %s", served.name, want[0], exc)
            return want[0], str(exc)
        return want[0], None

    def _clean(self, grant: Grant) -> None:
        served = self.rigs.get(grant.rig)
        if served is None:
            raise InfraError(f"{grant.rig} is not served by this agent", part=PART,
                             rig=grant.rig)
        served.close()  # never clean a rig a session still reaches
        served.clean()

    # --- the control socket: pdudaemon's switches, ``hil lab mux|flash`` ----------------------
    def _control(self, words: list[str]) -> str:
        """``power RIG EPOCH 1 on|off`` from pdudaemon, ``mux RIG EPOCH host|dut|off|status``,
        ``storage RIG EPOCH``, ``lease RIG EPOCH`` (a flash under way asks again and again) and
        ``flashed RIG EPOCH MB/S`` from ``hil lab mux|flash``: done only if EPOCH is the rig's
        live lease (the lab database's word)."""
        shapes = {"power": 5, "mux": 4, "storage": 3, "lease": 3, "flashed": 4}
        if len(words) < 3 or shapes.get(words[0]) != len(words) or (
                words[0] == "power" and (words[3] != "1" or words[4] not in ("on", "off"))) or (
                words[0] == "mux" and words[3] not in ("host", "dut", "off", "status")):
            raise ValueError(f"unknown request {' '.join(words)!r}")
        what, rig, epoch = words[0], words[1], words[2]
        served = self.rigs.get(rig)
        if served is None:
            raise ValueError(f"{rig} is not served here")
        refused = self.stale(rig, epoch)
        if refused:
            log.warning("%s: %s refused: %s", rig, " ".join([what, *words[3:]]), refused)
            raise ValueError(refused)
        if what == "lease":
            return "ok"
        if what == "mux" and words[3] == "status":
            return f"ok {served.mux_state()}"
        if what == "mux":
            served.mux(words[3])
            log.info("%s: sd mux %s (lease epoch %s)", rig, words[3], epoch)
            return "ok"
        if what == "storage":
            return "ok " + served.storage()
        if what == "flashed":
            log.info("%s: flashed and verified at %s MB/s (lease epoch %s)", rig, words[3],
                     epoch)
            return "ok"
        return self._power(served, epoch, words[4])

    def _power(self, served: ServedRig, epoch: str, action: str) -> str:
        """pdudaemon ignores a command's exit status: a refusal only prevents the switch, and is
        logged; what refuses a stale power request to its face is pdudaemon's unknown PDU."""
        rig = served.name
        try:
            served.power(action == "on")
        except Exception as exc:
            log.error("%s: power %s failed under lease epoch %s: %s; its endpoints are closed",
                      rig, action, epoch, exc)
            served.fault(int(epoch))
            raise ValueError(f"power {action} failed: {exc}") from None
        log.info("%s: power %s (lease epoch %s)", rig, action, epoch)
        return "ok"

    def stale(self, rig: str, epoch: str) -> str:
        """Why ``epoch`` may not touch ``rig`` (the lab database's word), or "" if it may."""
        try:
            with db.connect(self.dsn) as conn:
                row = conn.execute(
                    "SELECT r.epoch, r.state, l.epoch AS live FROM rigs r LEFT JOIN leases l "
                    "ON l.rig = r.name AND l.ended_at IS NULL AND l.expires_at > now() "
                    "WHERE r.name = %s", (rig,)).fetchone()
        except InfraError as exc:
            return f"cannot check lease epoch {epoch} of {rig}: {exc}"
        if row is not None and str(row["live"]) == epoch:
            return ""
        now = "no such rig is registered" if row is None else (
            f"the rig is at epoch {row['epoch']}, {row['state']}, "
            + (f"live lease epoch {row['live']}" if row["live"] is not None else "no live lease"))
        return f"lease epoch {epoch} of {rig} is stale ({now})"


def serve(dsn: str, name: str, rig_files: Sequence[str], ports: Ports, *,
          labels: Sequence[str] = (), interval: float = 10.0, checks: Policy | None = None,
          ssh: SshAccess | None = None, stop: threading.Event | None = None) -> None:
    """Run the agent until ``stop`` is set (or SIGTERM/Ctrl-C); everything it started stops."""
    agent = Agent(dsn, name, rig_files, ports, labels=labels, interval=interval,
                  checks=checks, ssh=ssh).start()
    try:
        agent.run(stop)
    finally:
        agent.stop()
