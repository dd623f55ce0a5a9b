"""``hil.ntp.NtpServer`` for real: a chronyd on loopback, asked for the time by our SNTP client
and by a second chronyd acting as the device (``chronyd -Q``, as platform notes §6 check it).

Most tests use a free high port (no clash with other sessions on :123); one uses :123 itself.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.ntp import NtpServer, bind_address_for, port_holders, sntp_query

pytestmark = pytest.mark.skipif(shutil.which("chronyd") is None,
                                reason="chronyd is not installed (apt-get install chrony)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> int:
    """A free port, and a lock directory of its own (no lock files left for random ports)."""
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    return free_udp_port()


@pytest.fixture
def server(port: int) -> Iterator[NtpServer]:
    with NtpServer("127.0.0.1", port, what="tests/ntp") as s:
        yield s


def chrony_client_offset(port: int) -> float:
    """What a chronyd client measures against the server: 'System clock wrong by X'."""
    run = subprocess.run(["chronyd", "-Q", "-t", "15", "-f", "/dev/null",
                          f"server 127.0.0.1 port {port} iburst maxsamples 4"],
                         capture_output=True, text=True, timeout=30)
    m = re.search(r"System clock wrong by (-?[0-9.]+) seconds", run.stdout + run.stderr)
    assert m, f"chronyd -Q got no time from the server:\n{run.stdout}{run.stderr}"
    return float(m.group(1))


def test_serves_a_synchronised_stratum_8_time(server: NtpServer, port: int) -> None:
    reply = sntp_query("127.0.0.1", port)
    assert reply is not None and reply.synchronised
    assert reply.stratum == 8
    assert abs(reply.offset) < 0.1
    assert abs(chrony_client_offset(port)) < 0.1  # a real NTP client agrees


def test_offset_shifts_what_clients_get(server: NtpServer, port: int) -> None:
    t0 = time.monotonic()
    server.set_offset(300)
    took = time.monotonic() - t0
    assert took < 10, f"setting the offset took {took:.1f}s"
    assert server.measure_offset() == pytest.approx(300, abs=0.25)
    # chronyd as a client sees its clock 300 s behind the server
    assert chrony_client_offset(port) == pytest.approx(300, abs=0.5)
    server.set_offset(-42.5)  # fractions and negative offsets too
    assert server.measure_offset() == pytest.approx(-42.5, abs=0.25)
    server.set_offset(0)
    assert server.measure_offset() == pytest.approx(0, abs=0.25)


def test_stopped_server_answers_nothing_and_keeps_the_port(server: NtpServer, port: int) -> None:
    pid = server.pid
    server.stop()
    assert not server.running and pid is not None
    assert not Path(f"/proc/{pid}").exists(), "chronyd was not reaped"
    assert sntp_query("127.0.0.1", port, timeout=1.0) is None
    # nobody else can serve the port while ours is down
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
    assert server.ignored_requests >= 1  # our query reached the silent port
    server.check_exclusive()


def test_restart_serves_again_with_the_same_offset(server: NtpServer, port: int) -> None:
    server.set_offset(120)
    server.stop()
    t0 = time.monotonic()
    server.start()
    assert time.monotonic() - t0 < 10
    assert server.running
    assert server.measure_offset() == pytest.approx(120, abs=0.25)
    server.restart()
    assert server.measure_offset() == pytest.approx(120, abs=0.25)
    assert "chronyd exiting" in server.log_text()  # both runs' logs are kept


def test_offset_set_while_stopped_applies_at_start(server: NtpServer) -> None:
    server.stop()
    server.set_offset(-60)
    server.start()
    assert server.measure_offset() == pytest.approx(-60, abs=0.25)


def test_close_frees_the_port_and_leaves_no_process(port: int) -> None:
    s = NtpServer("127.0.0.1", port)
    s.start()
    pid = s.pid
    s.stop()
    s.close()
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert port_holders("127.0.0.1", port) == []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", port))  # free again


def test_a_second_session_waits_then_names_the_holder(server: NtpServer, port: int) -> None:
    second = NtpServer("127.0.0.1", port, lock_wait=0.5, what="the second session")
    t0 = time.monotonic()
    with pytest.raises(InfraError) as err:
        second.start()
    assert 0.4 < time.monotonic() - t0 < 5
    assert "tests/ntp" in str(err.value) and "pid" in str(err.value)
    second.close()
    assert sntp_query("127.0.0.1", port) is not None  # the first one is untouched


def test_a_foreign_server_on_the_port_is_a_rig_error(port: int, tmp_path: Path) -> None:
    """chronyd binds with SO_REUSEPORT: a second one would silently share the port, so a
    foreign process there must stop us, naming it."""
    tmp_path.chmod(0o700)
    conf = tmp_path / "foreign.conf"
    conf.write_text(f"local stratum 5\nallow all\nbindaddress 127.0.0.1\nport {port}\n"
                    f"cmdport 0\npidfile {tmp_path}/pid\n")
    foreign = subprocess.Popen(["chronyd", "-d", "-x", "-4", "-u", "root", "-f", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not port_holders("127.0.0.1", port):
            assert time.monotonic() < deadline, "the foreign chronyd never bound its port"
            time.sleep(0.05)
        s = NtpServer("127.0.0.1", port)
        with pytest.raises(InfraError) as err:
            s.start()
        s.close()
        assert f"pid {foreign.pid}" in str(err.value) and "chronyd" in str(err.value)
    finally:
        foreign.kill()
        foreign.wait(timeout=10)


def test_chronyd_that_cannot_start_is_a_rig_error_with_its_log(port: int) -> None:
    s = NtpServer("127.0.0.1", port, start_timeout=5)
    s.stratum = 99  # chronyd rejects the configuration
    with pytest.raises(InfraError) as err:
        s.start()
    s.close()
    assert "chronyd" in str(err.value)


def test_bind_address_for_the_rig_network() -> None:
    assert bind_address_for("10.0.2.2") == "127.0.0.1"  # QEMU user networking
    assert bind_address_for("127.0.0.1") == "127.0.0.1"  # an address of ours: just that
    assert bind_address_for("192.0.2.1") == "0.0.0.0"  # not ours (TEST-NET-1): all addresses
    assert bind_address_for("no-such-host.invalid") == "0.0.0.0"


def test_serves_on_port_123_as_the_qemu_guest_sees_it() -> None:
    """The real thing: :123 on loopback, what a QEMU guest reaches as 10.0.2.2."""
    # A session's NTP suite may hold :123 (make test runs two streams): wait for its lock.
    server = NtpServer.for_host_address("10.0.2.2", lock_wait=600, what="tests/ntp :123")
    try:
        server.start()
    except InfraError as exc:
        server.close()
        if "already served by" not in str(exc):
            raise
        pytest.skip(f"127.0.0.1:123 is served by something else on this host: {exc}")
    with server as s:
        assert (s.address, s.port) == ("127.0.0.1", 123)
        assert abs(chrony_client_offset(123)) < 0.1
