"""The lab end to end: a throwaway PostgreSQL, two bench hosts as network namespaces (veth pairs,
addresses of their own), each running ``hil lab agent`` with one emulated RPi 3 bench (a QEMU
board behind a relay board on a pty, its UART on a pty, a virtual SD mux holding the reference
OS) and an SSH server (dropbear) for the SD mux and flashing, and a CI side that reaches them
only over the network. The agents check their new rigs by themselves (power on, U-Boot's
banner) before the pool gives them jobs. ``pytest --rig=pool:... -n 2 suites/smoke`` flashes
the reference OS onto both over SSH and passes, then a lease ended by ``hil lab release``
while a session holds it closes that rig's endpoints and the session stops with an INFRA error;
a flash and a mux switch with a stale epoch are refused without touching the card; and a
session whose rig's relay goes silent continues on the other rig (the test that met the silent
relay runs again there), while the silent one fails its health check and ends *bad*."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.errors import InfraError
from hil.lab import db, leases, scratch
from hil.lab.benchops import LEASE_CHECK_INTERVAL
from hil.lab.rigs import rig_config
from hil.parts import RemoteStorage
from hil.rig import Rig
from tests.lab.helpers import done, rig_row

ROOT = Path(__file__).resolve().parents[2]
DEVICE_TYPE = "generic-aarch64"
CARD_SIZE = 2 * 1024**3

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or scratch.binaries() is None or not all(
        shutil.which(b) for b in ("ip", "ser2net", "qemu-system-aarch64", "dropbear",
                                  "unshare")),
    reason="needs root (network namespaces), PostgreSQL, ser2net, dropbear and "
           "qemu-system-aarch64")

# A bench host's rig file: the parts as wired on the bench (relay on a tty, the UART's tty,
# an SD mux), the hardware behind them emulated (hil.emu).
BENCH_RIG = """description: Emulated RPi 3 on lab bench host {host}
device_type: generic-aarch64
image: refos
power_off_time: 0.5
power: {{driver: serial-relay, port: relay-tty, channel: 1, normally: open, status: query}}
console: {{driver: serial, url: console-tty}}
sd_mux: {{driver: virtual, image: {rig}-card.img, size: {size}, host_side: loop}}
storage: {{driver: block, match: {{"ATTR{{loop/backing_file}}": "*/{rig}-card.img"}}, fixed: true}}
network: {{driver: ssh, host: 127.0.0.1, port: 22301, host_address: 10.0.2.2}}
emulator:
  board: {{memory: 512}}
  relay: {{channels: 4, status: text}}
"""

KICKED_TEST = """
from hil.dut import Dut

def test_holds_the_board(dut: Dut) -> None:
    dut.run_check("true")

def test_after_the_kick(dut: Dut) -> None:
    raise AssertionError("must not run on a rig it no longer holds")
"""

# The agents' health check: the board powers on through the served rig file's drivers and
# U-Boot's banner reaches the console.
HEALTH_CHECK = """
import os, re
from hil.config import load_rig
from hil.rig import Rig

rig = Rig(load_rig(os.environ["HIL_RIG"]))
try:
    rig.power_on()
    rig.log.wait_for(re.compile(rb"U-Boot 20\\d\\d"), 0, 120, "U-Boot's banner")
finally:
    rig.close()
"""

RELAY_GOES_SILENT = """
import os
from pathlib import Path
from hil.dut import Dut
from hil.emu import ctl

def seen(rig_config, name):
    Path(os.environ["SEEN_DIR"], name).write_text(rig_config.name)

def test_a_boots(dut: Dut, rig_config) -> None:
    dut.run_check("true")
    seen(rig_config, "first")
    sockets = dict(s.split("=") for s in os.environ["BENCH_SOCKETS"].split(","))
    assert ctl.request(sockets[rig_config.name], ["relay", "mute"]) == "ok"

def test_b_power_cycles(dut: Dut) -> None:
    dut.power_cycle()  # the relay does not answer: INFRA

def test_c_runs_on_the_other_rig(dut: Dut, rig_config) -> None:
    dut.run_check("true")
    seen(rig_config, "second")
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class BenchHost:
    name: str  # the host's and its namespace's
    rig: str
    netns: str
    veth: str  # the root namespace's end
    subnet: str  # 10.x.y
    dir: Path
    agent: subprocess.Popen[bytes] | None = None
    dropbear: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.subnet}.2"

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"

    def up(self) -> None:
        ip("netns", "add", self.netns)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", self.veth + "p")
        ip("link", "set", self.veth + "p", "netns", self.netns)
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", self.veth + "p")
        ip("-n", self.netns, "link", "set", self.veth + "p", "up")
        ip("-n", self.netns, "link", "set", "lo", "up")

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.send_signal(signal.SIGTERM)  # the agent powers its rigs off, stops QEMU
            try:
                self.agent.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.agent.pid, signal.SIGKILL)
                self.agent.wait()
                raise AssertionError(f"the agent of {self.name} ignored SIGTERM for 30s"
                                     ) from None

    def sshd(self, client_pub: str) -> None:
        """dropbear on the host's address, root's logins checked against ``client_pub``: in a
        mount namespace of its own whose /etc/passwd gives root a home in the test's
        directory (the machine's own root account is not touched)."""
        home = self.dir / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(client_pub + "\n")
        passwd = self.dir / "passwd"
        passwd.write_text("".join(
            f"root:x:0:0:root:{home}:/bin/sh\n" if line.startswith("root:") else line
            for line in Path("/etc/passwd").read_text().splitlines(keepends=True)))
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(self.dir / "host_key")],
                       check=True, capture_output=True, timeout=30)
        pub = subprocess.run(["dropbearkey", "-y", "-f", str(self.dir / "host_key")],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        self.host_key.write_text(next(ln for ln in pub.splitlines() if ln.startswith("ssh-")))
        with (self.dir / "sshd.log").open("wb") as out:
            self.dropbear = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "-m", "sh", "-c",
                 'mount --bind "$0" /etc/passwd && exec dropbear -F -E -s -m -r "$1" -p "$2" '
                 '-P "$3"', str(passwd), str(self.dir / "host_key"), f"{self.address}:22",
                 str(self.dir / "sshd.pid")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def host_key(self) -> Path:
        return self.dir / "host_key.pub"

    def down(self) -> None:
        if self.dropbear is not None:
            self.dropbear.terminate()
            self.dropbear.wait(10)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=30)

    def prepare(self, card: Path) -> Path:
        """The rig file, and the reference OS on the rig's card, in the board."""
        runtime = self.dir / "run" / "rigs" / self.rig
        runtime.mkdir(parents=True)
        subprocess.run(["cp", "--sparse=always", str(card), str(self.card)], check=True,
                       timeout=120)
        os.truncate(self.card, CARD_SIZE)
        rig = self.dir / f"{self.rig}.yaml"
        rig.write_text(BENCH_RIG.format(host=self.name, size=CARD_SIZE, rig=self.rig))
        return rig

    @property
    def card(self) -> Path:
        return self.dir / "run" / "rigs" / self.rig / f"{self.rig}-card.img"

    @property
    def emu_socket(self) -> Path:
        """The emulated bench's control socket (``relay mute``)."""
        return self.dir / "run" / "rigs" / self.rig / "emu.sock"

    def start(self, dsn: str, rig: Path, check: Path, key: Path) -> None:
        env = {**os.environ, "HIL_LAB_DB": dsn, "HIL_RUNTIME_DIR": str(self.dir / "run"),
               "HIL_LOCK_DIR": str(self.dir / "locks"), "PYTHONPATH": str(ROOT),
               "HIL_LAB_SSH_KEY": str(key)}  # its health checks switch the mux over SSH too
        with self.log.open("wb") as out:
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "hil.cli", "lab",
                 "agent", self.name, str(rig), "--address", self.address, "--interval", "2",
                 "--health-check", f"{sys.executable} {check}", "--ssh-user", "root",
                 "--ssh-host-key", str(self.host_key)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def check(self) -> None:
        if self.agent is not None and self.agent.poll() is not None:
            raise AssertionError(f"the agent of {self.name} exited with status "
                                 f"{self.agent.returncode}:\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab_hosts(tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, list[BenchHost], Path]]:
    """Two bench hosts in namespaces, a database they reach over their veths; yields the CI
    side's DSN, the hosts and the CI side's SSH key for them, their agents running with the
    rigs registered and made good by the agents' own health checks."""
    tmp_path = tmp_path_factory.mktemp("lab")
    check = tmp_path / "health_check.py"
    check.write_text(HEALTH_CHECK)
    tag = f"{os.getpid() % 100000}"
    octet = 16 + os.getpid() % 200
    hosts = [BenchHost(f"bench-{x}", f"lab-rpi3-{x}", f"hil-lab-{tag}-{x}", f"hl{tag}{x}",
                       f"10.{octet}.{i}", tmp_path / x) for i, x in enumerate("ab", 1)]
    with contextlib.ExitStack() as stack:
        for h in hosts:
            stack.callback(h.down)
            h.up()
        server = stack.enter_context(scratch.server(listen=[f"{h.subnet}.1/24" for h in hosts]))
        dsn = scratch.database(server, f"lab_{uuid.uuid4().hex[:12]}")
        card = _reference_os_card(tmp_path)
        key = tmp_path / "ci_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
        for h in hosts:
            h.dir.mkdir()
            rig = h.prepare(card)
            h.sshd(key.with_suffix(".pub").read_text().strip())
            stack.callback(h.stop)
            h.start(dsn.replace("host=127.0.0.1", f"host={h.subnet}.1"), rig, check, key)
        card.unlink()
        with db.connect(dsn, autocommit=True) as conn:
            def registered() -> bool:
                for h in hosts:
                    h.check()
                return len(conn.execute("SELECT name FROM rigs").fetchall()) == len(hosts)

            wait_until(registered, 60, "both agents to register their rigs",
                       seen=lambda: "; ".join(h.log.read_text()[-500:] for h in hosts))

            def checked() -> bool:
                health = {r["name"]: r["health"] for r in conn.execute(
                    "SELECT name, health FROM rigs").fetchall()}
                assert "bad" not in health.values(), health
                return set(health.values()) == {"good"}

            wait_until(checked, 180, "both rigs' first health checks to pass",
                       seen=lambda: "; ".join(h.log.read_text()[-800:] for h in hosts))
        yield dsn, hosts, key


def _reference_os_card(tmp_path: Path) -> Path:
    """The reference OS image with a config.json, as a session would flash it."""
    from hil.flash.configure import configure_image
    from hil.refos import build

    cfg = {"uuid": uuid.uuid4().hex, "deviceType": DEVICE_TYPE, "developmentMode": True,
           "persistentLogging": False, "os": {"sshKeys": []}}
    return configure_image(build(arch="aarch64").disk, cfg, out=tmp_path / "card.img")


def ci_env(dsn: str, tmp_path: Path, key: Path) -> dict[str, str]:
    return {**os.environ, "HIL_LAB_DB": dsn, "HIL_RUNTIME_DIR": str(tmp_path / "ci"),
            "HIL_LOCK_DIR": str(tmp_path / "ci-locks"), "PYTHONPATH": str(ROOT),
            "HIL_LAB_SSH_KEY": str(key)}


def ci_pytest(dsn: str, tmp_path: Path, key: Path, *args: str, timeout: float,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**ci_env(dsn, tmp_path, key), **(env or {})}
    full.pop("HIL_RIG", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "-rA", *args], cwd=ROOT, env=full, text=True,
                          capture_output=True, timeout=timeout)


def closed(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_two_bench_hosts_flash_and_serve_a_pooled_smoke_run_and_a_kicked_session_stops(
        lab_hosts: tuple[str, list[BenchHost], Path], tmp_path: Path) -> None:
    dsn, hosts, key = lab_hosts
    cards = {h.rig: h.card.stat().st_mtime_ns for h in hosts}
    smoke = ci_pytest(dsn, tmp_path, key, f"--rig=pool:{DEVICE_TYPE}", "-n", "2",
                      "suites/smoke", timeout=400)
    assert smoke.returncode == 0, smoke.stdout[-5000:] + smoke.stderr[-2000:]
    assert "5 passed" in smoke.stdout, smoke.stdout[-3000:]  # every smoke test ran, none skipped
    for h in hosts:  # each worker flashed its rig's card on its bench host, then booted it
        assert h.card.stat().st_mtime_ns != cards[h.rig], f"{h.rig}'s card was not written"
        log = h.log.read_text()
        assert re.search(rf"{h.rig}: flashed and verified at [\d.]+ MB/s", log), log[-3000:]
        assert f"{h.rig}: sd mux dut" in log, log[-3000:]
    with db.connect(dsn, autocommit=True) as conn:
        jobs = conn.execute("SELECT rig, outcome FROM jobs WHERE purpose = 'job' "
                            "ORDER BY rig").fetchall()
        assert [(j["rig"], j["outcome"]) for j in jobs] == [
            ("lab-rpi3-a", "passed"), ("lab-rpi3-b", "passed")]  # each worker on its own host

        # a session on bench-a's rig, kicked by an operator while it waits for the boot
        a = hosts[0]
        test = tmp_path / "test_kicked.py"
        test.write_text(KICKED_TEST)
        env = ci_env(dsn, tmp_path, key)
        with (tmp_path / "kicked.log").open("w") as out:
            kicked = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                 "--log-level=INFO", "--no-flash", f"--rig=pool:{DEVICE_TYPE},rig={a.rig}",
                 str(test)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            epoch = int(rig_row(conn, a.rig)["epoch"]) + 1  # the session's lease

            def powered_on() -> bool:
                return kicked.poll() is not None or \
                    f"power on (lease epoch {epoch})" in a.log.read_text()

            wait_until(powered_on, 60, "the session to power the board on",
                       seen=lambda: a.log.read_text()[-500:])
            release = subprocess.run([sys.executable, "-m", "hil.cli", "lab", "release", a.rig,
                                      "--epoch", str(epoch)], env=env, capture_output=True,
                                     text=True, timeout=30)
            assert release.returncode == 0, release.stdout + release.stderr
            kicked.wait(60)
        finally:
            kicked.kill()
            kicked.wait()
        output = (tmp_path / "kicked.log").read_text()
        assert kicked.returncode != 0, output
        assert "rig (infrastructure) errors" in output and " infra in " in output, output[-5000:]
        assert "console lost" in output
        assert "must not run" not in output
        # its teardown leaves the power and the mux to the bench host: neither tried nor errors
        assert "failed during teardown" not in output, output[-5000:]
        assert (f"rig {a.rig}: power off and mux release left to the lab during teardown: the "
                "lease ended") in output, output[-5000:]
        assert f"lease epoch {epoch} of {a.rig} is stale" not in a.log.read_text()
        for port in (7400, 7401, 7402):  # console, pdudaemon, ssh: all closed
            assert closed(a.address, port), f"{a.address}:{port} still open after the release"
        wait_until(lambda: rig_row(conn, a.rig)["state"] == "idle", 30,
                   "bench-a's agent to clean the rig", seen=lambda: a.log.read_text()[-500:])
        assert f"lab-rpi3-a: lease epoch {epoch} ended" in a.log.read_text()


def test_a_stale_epoch_flash_and_mux_switch_are_refused_without_touching_the_card(
        lab_hosts: tuple[str, list[BenchHost], Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dsn, hosts, key = lab_hosts
    b = hosts[1]
    monkeypatch.setenv("HIL_LAB_SSH_KEY", str(key))
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "ci"))
    image = tmp_path / "new.img"
    image.write_bytes(b"\x5a" * (1 << 20))
    lease = leases.acquire(dsn, leases.Selector(DEVICE_TYPE, rig=b.rig), queue_timeout=60)
    try:
        grant = lease.grants[0]
        mux_file = b.card.with_name(b.card.name + ".mux")
        card, position = b.card.stat().st_mtime_ns, mux_file.read_text()
        rig = Rig(rig_config(dataclasses.replace(grant, epoch=grant.epoch - 1)))
        try:
            assert isinstance(rig.storage, RemoteStorage) and rig.sd_mux is not None
            with pytest.raises(InfraError, match=rf"\[rig {b.rig} storage\] .*lease epoch "
                               rf"{grant.epoch - 1} of {b.rig} is stale .*live lease epoch "
                               rf"{grant.epoch}"):
                rig.storage.write(image, None, 60)
            with pytest.raises(InfraError, match=rf"\[rig {b.rig} sd_mux\] .*is stale"):
                rig.sd_mux.to_host()
        finally:
            rig.close(power_off=False)
        assert b.card.stat().st_mtime_ns == card
        assert mux_file.read_text() == position
        assert f"{b.rig}: storage refused: lease epoch {grant.epoch - 1}" in b.log.read_text()
    finally:
        with db.connect(dsn) as conn:
            done(lease, conn)


def test_a_flash_under_way_stops_when_its_lease_ends(
        lab_hosts: tuple[str, list[BenchHost], Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator ends the lease while the session streams an image to the card: the write
    stops (here the agent's cleaning switches the mux away under it first; the writer's own
    lease check, for a disk no mux can take away, is in test_agent.py), the session's flash
    fails naming the stale lease, and the mux reports its position through the bench host."""
    dsn, hosts, key = lab_hosts
    b = hosts[1]
    monkeypatch.setenv("HIL_LAB_SSH_KEY", str(key))
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "ci"))
    image = tmp_path / "big.img"
    block = os.urandom(1 << 20)
    with image.open("wb") as f:  # no zero block: all of it crosses the wire and is written
        for _ in range(768):
            f.write(block)
    # the card holds the reference OS the next tests boot (--no-flash): put back afterwards
    saved = tmp_path / "card.img"
    subprocess.run(["cp", "--sparse=always", str(b.card), str(saved)], check=True, timeout=120)
    lease = leases.acquire(dsn, leases.Selector(DEVICE_TYPE, rig=b.rig), queue_timeout=60)
    grant = lease.grants[0]
    rig = Rig(rig_config(grant))
    outcome: list[BaseException | None] = []
    try:
        assert isinstance(rig.storage, RemoteStorage) and rig.sd_mux is not None
        rig.sd_mux.to_host()
        assert rig.sd_mux.state() == "host"
        before = b.card.stat().st_mtime_ns

        def write() -> None:
            assert isinstance(rig.storage, RemoteStorage)
            try:
                rig.storage.write(image, None, 300)
                outcome.append(None)
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        wait_until(lambda: b.card.stat().st_mtime_ns != before or bool(outcome), 60,
                   "the bench host to start writing the card")
        assert not outcome, f"the flash ended before the lease did: {outcome}"
        with db.connect(dsn) as conn:
            leases.release(conn, b.rig, grant.epoch, by="an operator")
        writer.join(LEASE_CHECK_INTERVAL + 30)
        assert not writer.is_alive(), "the flash went on after its lease ended"
        assert isinstance(outcome[0], InfraError), f"the flash ended with {outcome[0]!r}"
        assert re.search(rf"the flash was stopped: lease epoch {grant.epoch} of {b.rig} is "
                         r"stale", str(outcome[0])), str(outcome[0])
    finally:
        lease.stop_heartbeat()
        rig.close(power_off=False)
    with db.connect(dsn) as conn:
        wait_until(lambda: rig_row(conn, b.rig)["state"] == "idle", 30,
                   f"{b.name}'s agent to clean the rig", seen=lambda: b.log.read_text()[-500:])
    subprocess.run(["cp", "--sparse=always", str(saved), str(b.card)], check=True, timeout=120)


def test_a_rig_whose_relay_goes_silent_ends_bad_while_the_job_finishes_on_the_other(
        lab_hosts: tuple[str, list[BenchHost], Path], tmp_path: Path) -> None:
    dsn, hosts, key = lab_hosts
    test = tmp_path / "test_relay_goes_silent.py"
    test.write_text(RELAY_GOES_SILENT)
    run = ci_pytest(dsn, tmp_path, key, f"--rig=pool:{DEVICE_TYPE}", "--no-flash",
                    "--lab-release=e2e-1",
                    str(test), timeout=400, env={
                        "SEEN_DIR": str(tmp_path),
                        "BENCH_SOCKETS": ",".join(f"{h.rig}={h.emu_socket}" for h in hosts)})
    out = run.stdout + run.stderr
    outcomes = re.findall(r"(\d+) (passed|rerun|infra|failed)", out.splitlines()[-1])
    # the power cycle that met the silent relay ran again on the other rig, and passed there
    assert sorted((o, int(n)) for n, o in outcomes) == [("passed", 3), ("rerun", 1)], out[-5000:]
    assert run.returncode == 0, out[-5000:]
    first, second = ((tmp_path / n).read_text() for n in ("first", "second"))
    assert first != second, out[-3000:]
    assert "did not answer" in out, out[-5000:]
    assert re.search(rf"^INFRA \S+::test_b_power_cycles - rig {first}, power: .*\(run again on "
                     r"another rig\)$", out, re.M), out[-5000:]
    assert f"the session continued on {second}" in out, out[-5000:]
    silent = next(h for h in hosts if h.rig == first)
    with db.connect(dsn, autocommit=True) as conn:
        wait_until(lambda: rig_row(conn, first)["health"] == "bad", 120,
                   f"{first}'s health check to find it bad",
                   seen=lambda: f"{rig_row(conn, first)['health']}; "
                                f"{silent.log.read_text()[-800:]}")
        events = conn.execute("SELECT old, new, reason FROM health_events WHERE rig = %s "
                              "ORDER BY id DESC LIMIT 2", (first,)).fetchall()[::-1]
        assert [(e["old"], e["new"]) for e in events] == [("good", "unknown"),
                                                          ("unknown", "bad")], events
        assert "health check failed" in events[1]["reason"]
        jobs = conn.execute("SELECT rig, purpose, outcome, suites FROM jobs WHERE "
                            "release = 'e2e-1' ORDER BY id").fetchall()
        suite = tmp_path.name
        assert [(j["rig"], j["outcome"], j["suites"]) for j in jobs] == [
            (first, "infra", {suite: "infra"}), (second, "passed", {suite: "passed"})]
        assert rig_row(conn, second)["health"] == "good"
        wait_until(lambda: rig_row(conn, second)["state"] == "idle", 30,
                   f"{second} to be given back")
    assert f"{first}: health check failed: bad" in silent.log.read_text()
