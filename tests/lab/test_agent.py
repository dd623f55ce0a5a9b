"""``hil lab agent`` in-process on loopback: real ser2net, real pdudaemon, the real console and
power drivers of the rig file the lab hands out; the bench rig's console is a pty, its power
switch a command, the board's SSH server a TCP echo server. No board boots."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.emu.procs import tcp_listening
from hil.emu.pty import PtyPort
from hil.errors import ConfigError, InfraError
from hil.lab import db, leases, scratch
from hil.lab.agent import Agent, Ports
from hil.lab.benchops import LEASE_CHECK_INTERVAL
from hil.lab.db import Connection
from hil.lab.imagestream import send
from hil.lab.leases import Selector
from hil.lab.pool import leased_config
from hil.rig import Rig
from tests.lab.helpers import done, rig_row


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP server standing in for the board's SSH: echoes what it gets."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(
                lambda: c.recv(4096), b"")], daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def free_ports() -> int:
    """A base for the agent's three consecutive ports, all free, below the kernel's ephemeral
    range (where any client socket could take the second or third after they were checked)."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + 3):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError("no three consecutive free ports in 20000-30000")


@contextlib.contextmanager
def serving(dsn: str, folder: Path, switch_on: str | None = None, storage: str = ""
            ) -> Iterator[tuple[Agent, PtyPort, Path]]:
    """An agent serving one rig (bench-pi), running its loop in a thread. Its power switch
    records to a file, unless ``switch_on`` says otherwise; ``storage``: its storage part's
    settings, if it has one."""
    uart = PtyPort(folder / "uart")
    uart.plug()
    power = folder / "power"
    with echo_server() as ssh_port:
        rig = folder / "bench-pi.yaml"
        rig.write_text(f"""device_type: raspberrypi3
power: {{driver: command, on: "{switch_on or f'echo on >> {power}'}", off: "echo off >> {power}"}}
console: {{driver: serial, url: {uart.link}}}
network: {{driver: ssh, host: 127.0.0.1, port: {ssh_port}, host_address: 10.0.2.2}}
""" + (f"storage: {storage}\n" if storage else ""))
        agent = Agent(dsn, "bench1", [str(rig)], Ports("127.0.0.1", free_ports()),
                      interval=0.5).start()
        stop = threading.Event()
        loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        loop.start()
        try:
            with db.connect(dsn) as conn:
                conn.execute("UPDATE rigs SET health = 'good'")
                conn.commit()
            yield agent, uart, power
        finally:
            stop.set()
            loop.join(10)
            agent.stop()
            uart.unplug()


@pytest.fixture
def bench(request: pytest.FixtureRequest, lab_dsn: str, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Agent, PtyPort, Path]]:
    """``serving`` on the test's database; indirect parametrization gives the switch-on
    command."""
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    with serving(lab_dsn, tmp_path, getattr(request, "param", None)) as served:
        yield served


def switches(power: Path) -> list[str]:
    return power.read_text().split() if power.exists() else []


@contextlib.contextmanager
def remote_session(dsn: str) -> Iterator[Rig]:
    """What a session on a leased rig does first: the rig the lab hands out, its console open."""
    lease = leases.acquire(dsn, Selector("raspberrypi3"), holder="ci job 1", ttl=30)
    rig = Rig(leased_config(lease))  # once the agent has served the lease
    try:
        rig.console.attach(timeout=10)
        yield rig
    finally:
        lease.stop_heartbeat()
        rig.close()


def console_dropped(rig: Rig) -> None:
    wait_until(lambda: rig.log.down, 10, "the console session to be dropped",
               seen=lambda: "console still connected")


def test_a_lease_reaches_the_rig_through_the_agent_and_loses_it_when_it_ends(
        bench: tuple[Agent, PtyPort, Path], lab: Connection, lab_dsn: str) -> None:
    agent, uart, power = bench
    served = agent.rigs["bench-pi"]
    assert switches(power) == ["off"]  # the agent starts its rigs powered off
    assert not tcp_listening(served.console_port)  # nothing is served without a lease

    with remote_session(lab_dsn) as rig:
        assert rig.config.parts["power"].settings.hostname == "bench-pi.lease1"  # type: ignore[attr-defined]
        uart.write(b"U-Boot 2023.01\r\n")
        rig.log.wait_for(re.compile(rb"U-Boot"), 0, 10, "the board's output through ser2net")
        rig.power.on()
        assert switches(power) == ["off", "on"]
        assert rig.network is not None
        with socket.create_connection(rig.network.ssh_endpoint(), timeout=5) as ssh:
            ssh.sendall(b"SSH-2.0-x\r\n")
            assert ssh.recv(100) == b"SSH-2.0-x\r\n"

            leases.release(lab, "bench-pi", 1, by="an operator")  # the session is kicked
            console_dropped(rig)
            assert ssh.recv(100) == b""  # the SSH connection is cut too
        assert not any(map(tcp_listening, (served.console_port, served.pdu_port, served.ssh_port)))
        with pytest.raises(InfraError, match=r"pdudaemon at .* is unreachable .* for "
                           r"bench-pi.lease1 outlet 1"):
            rig.power.on()
        wait_until(lambda: rig_row(lab, "bench-pi")["state"] == "idle", 10,
                   "the agent to clean the rig")
        assert switches(power) == ["off", "on", "off"]  # refused: never switched on again


def test_a_stale_epoch_is_refused_while_a_newer_lease_holds_the_rig(
        bench: tuple[Agent, PtyPort, Path], lab: Connection, lab_dsn: str) -> None:
    agent, _, power = bench
    old = leases.acquire(lab_dsn, Selector("raspberrypi3"), holder="ci job 1", ttl=30)
    stale = Rig(leased_config(old))
    stale.console.attach(timeout=10)
    done(old, lab)  # the holder gives it back cleaned: the agent sees no cleaning to do
    served = agent.rigs["bench-pi"]
    wait_until(lambda: not tcp_listening(served.console_port), 10,
               "the agent to close the console of the lease that ended")
    new = leases.acquire(lab_dsn, Selector("raspberrypi3"), holder="ci job 2", ttl=30)
    fresh = Rig(leased_config(new))
    try:
        fresh.console.attach(timeout=10)  # a session's first step: the endpoints are up
        with pytest.raises(InfraError, match=r"refused on for bench-pi.lease1 outlet 1: HTTP 500"):
            stale.power.on()
        assert agent.stale("bench-pi", "1") == ("lease epoch 1 of bench-pi is stale (the rig is "
                                                "at epoch 2, leased, live lease epoch 2)")
        fresh.power.on()
        assert switches(power)[-1] == "on"
    finally:
        new.stop_heartbeat()
        stale.close()
        fresh.close()


@pytest.mark.parametrize("bench", ["exit 1"], indirect=True)
def test_a_power_switch_that_fails_on_the_bench_cuts_the_session_off(
        bench: tuple[Agent, PtyPort, Path], lab_dsn: str) -> None:
    agent, _, _ = bench
    with remote_session(lab_dsn) as rig:
        with pytest.raises(InfraError, match=r"\[rig bench-pi power\] pdudaemon at .* for "
                           r"bench-pi.lease1 outlet 1"):
            rig.power.on()  # pdudaemon itself would answer 200: it ignores the switch's status
        console_dropped(rig)
        assert agent.rigs["bench-pi"].epoch is None  # not served again under this lease


def test_a_rig_the_agent_cannot_serve_is_named(tmp_path: Path, lab_dsn: str) -> None:
    rig = tmp_path / "remote-pi.yaml"
    rig.write_text("""device_type: raspberrypi3
power: {driver: command, on: "true", off: "true"}
console: {driver: serial, url: "rfc2217://bench9:3001"}
""")
    with pytest.raises(ConfigError, match=r"remote-pi.yaml.*console.url.*must be a tty"):
        Agent(lab_dsn, "bench1", [str(rig)], Ports("127.0.0.1"))


def test_an_agent_that_stops_cuts_its_sessions_off(
        bench: tuple[Agent, PtyPort, Path], lab_dsn: str) -> None:
    agent, _, _ = bench
    with remote_session(lab_dsn) as rig:
        agent.stop()  # the bench host goes away (its daemons die with it even on SIGKILL)
        console_dropped(rig)
        with pytest.raises(InfraError, match=r"\[rig bench-pi power\] pdudaemon at "
                           r"http://127.0.0.1:\d+ is unreachable"):
            rig.power.on()


def test_without_the_database_a_lease_is_served_until_its_known_expiry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    with contextlib.ExitStack() as database:
        dsn = scratch.database(database.enter_context(scratch.server()), "lab")
        with serving(dsn, tmp_path) as (agent, _, _):
            lease = leases.acquire(dsn, Selector("raspberrypi3"), holder="ci job 1", ttl=6)
            lease.stop_heartbeat()  # the holder cannot renew either: the database is gone
            served = agent.rigs["bench-pi"]
            wait_until(lambda: tcp_listening(served.console_port), 10,
                       "the console to be served")
            database.close()  # the database goes down, the agent stays
            assert tcp_listening(served.console_port)  # the lease has seconds left
            wait_until(lambda: not tcp_listening(served.console_port), 6 + 10,
                       "the agent to close the endpoints at the lease's expiry")


def test_a_flash_on_the_rigs_own_disk_stops_when_its_lease_ends(
        lab_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rig whose disk the bench host writes in place (no mux for the cleaning to switch away):
    an operator ends the lease while ``hil lab flash`` writes it, and the writer stops at its
    next lease check. The session's side is the image stream, sent slowly, as over a slow link."""
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    disk = tmp_path / "disk.img"
    image = tmp_path / "new.img"
    block = os.urandom(1 << 20)
    with image.open("wb") as f:
        for _ in range(64):
            f.write(block)
    with serving(lab_dsn, tmp_path, storage=f"{{driver: file, path: {disk}, size: 268435456}}"
                 ) as (agent, _, _):
        lease = leases.acquire(lab_dsn, Selector("raspberrypi3"), holder="ci job 1", ttl=30)
        epoch = lease.grants[0].epoch
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("hil")), "lab", "flash", "bench-pi", "--epoch",
             str(epoch), "--agent", str(agent.sock)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        sent = [0]

        def write(data: bytes) -> None:
            assert proc.stdin is not None
            proc.stdin.write(data)
            proc.stdin.flush()
            sent[0] += len(data)
            if sent[0] > 8 << 20:
                time.sleep(0.2)  # a few MB/s after the first 8 MiB: 64 MiB take over 10 s

        feeder = threading.Thread(target=_feed, args=(image, write), daemon=True)
        feeder.start()
        try:
            wait_until(lambda: disk.exists() and disk.stat().st_blocks > 0, 30,
                       "the bench host to start writing the disk")
            with db.connect(lab_dsn) as conn:
                leases.release(conn, "bench-pi", epoch, by="an operator")
            released = time.monotonic()
            proc.wait(timeout=LEASE_CHECK_INTERVAL + 30)  # the stream goes on meanwhile
        finally:
            lease.stop_heartbeat()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stopped_after = time.monotonic() - released
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert proc.returncode == 1, err.decode()
        reason = err.decode().strip().splitlines()[-1]
        assert reason.startswith(f"the flash was stopped: lease epoch {epoch} of bench-pi is "
                                 "stale"), reason
        assert "the lease check refused to go on" in reason, reason  # the writer's own check
        assert "holds an incomplete or unverified image" in reason, reason
        assert sent[0] < image.stat().st_size, "the whole image went through"
        assert stopped_after < LEASE_CHECK_INTERVAL + 10, stopped_after


def _feed(image: Path, write: Callable[[bytes], None]) -> None:
    """The session's side of ``hil lab flash``: the image stream, until the writer stops
    reading."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: the test closed the pipe
        send(image, None, write)
