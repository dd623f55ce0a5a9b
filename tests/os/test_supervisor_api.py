"""The supervisor's device API: the reference OS's stand-in (its own file, run here on the host
with its paths in a temp directory and no engine) answered by the suites' client
(``hil.os.supervisor.SupervisorAPI``), over a real TCP connection where a device gives an SSH
channel. What needs the engine (containers) is tested on QEMU boards by suites/containers."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from hil.deadline import WaitTally
from hil.errors import OSContractError
from hil.os.supervisor import SupervisorAPI

STAND_IN = (Path(__file__).resolve().parents[2] / "hil/refos/files/rootfs/usr/lib/hil/"
            "supervisor.py")
APP = {"local": {"name": "d", "config": {}, "apps": {"7": {
    "name": "app", "commit": "c1", "releaseId": 1,
    "services": {"1": {"serviceName": "main", "image": "busybox"}}}}}}


class Device:
    """The stand-in serving on loopback, and a client as the suites have it."""

    def __init__(self, mod: ModuleType, port: int, tmp: Path) -> None:
        self.mod, self.port, self.tmp = mod, port, tmp
        self.tally = WaitTally()
        dut: Any = SimpleNamespace(ssh=SimpleNamespace(tcp=self.connect),
                                   rig=SimpleNamespace(log=SimpleNamespace(tally=self.tally)))
        self.api = SupervisorAPI(dut)

    def connect(self, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def config(self, **values: object) -> None:
        (self.tmp / "config.json").write_text(json.dumps(values))


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    spec = importlib.util.spec_from_file_location("hil_supervisor_stand_in", STAND_IN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.CONFIG_JSON = str(tmp_path / "config.json")
    mod.STATE_DIR = str(tmp_path / "state")
    mod.STATE_FILE = str(tmp_path / "state" / "target-state.json")
    mod.APP_DATA = str(tmp_path / "data")
    mod.LOCK_DIR = str(tmp_path / "locks")
    mod.CONFIG_DUMP = str(tmp_path / "target-state-config")
    mod.ENGINE_SOCKET = str(tmp_path / "no-engine.sock")
    mod.SUP = mod.Supervisor()
    server = mod.http.server.ThreadingHTTPServer(("127.0.0.1", 0), mod.Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    dev = Device(mod, server.server_address[1], tmp_path)
    dev.config(developmentMode=True)
    try:
        yield dev
    finally:
        server.shutdown()
        server.server_close()


def test_ping_and_healthy_need_no_key_and_healthy_needs_the_engine(device: Device) -> None:
    device.config(developmentMode=False)
    assert (device.api.request("GET", "/ping").status, device.api.request("GET", "/ping").text
            ) == (200, "OK")
    healthy = device.api.healthy()
    assert (healthy.status, healthy.text) == (500, "Unhealthy")  # no engine answers
    assert device.tally.seconds.get("ssh", 0) > 0  # counted as waiting on the device


def test_a_production_device_needs_the_services_key(device: Device) -> None:
    key = device.mod.SUP.key_for("7", "main")
    device.config(developmentMode=False)
    assert device.api.request("GET", "/v2/local/target-state").status == 401
    assert device.api.request("GET", "/v2/local/target-state", key="f" * 32).status == 401
    assert device.api.request("GET", "/v2/local/target-state", key=key).status == 200
    assert device.api.request("GET", f"/v2/local/target-state?apikey={key}").status == 200
    # a key is accepted, but target states come only in local mode (development)
    refused = device.api.request("POST", "/v2/local/target-state", APP, key=key)
    assert refused.status == 400 and "local mode" in refused.text
    device.config(developmentMode=True)
    assert device.api.request("GET", "/v2/local/target-state").status == 200  # no key needed


def test_target_state_is_checked_kept_and_read_back(device: Device) -> None:
    bad = {"local": {"apps": {"7": {"services": {"1": {"serviceName": "main"}}}}}}
    r = device.api.request("POST", "/v2/local/target-state", bad)
    assert r.status == 400 and "needs an image" in r.text
    with pytest.raises(OSContractError, match="refused the target state"):
        device.api.set_target_state(bad)
    device.api.set_target_state(APP)
    assert device.api.target_state() == APP
    # kept on the data partition: a restarted supervisor has it
    assert device.mod.Supervisor().target == APP
    # its config dumped where the host OS's safe_reboot looks for the override lock
    config = {"SUPERVISOR_OVERRIDE_LOCK": "true"}
    device.api.set_target_state({**APP, "local": {**APP["local"], "config": config}})
    assert json.loads((device.tmp / "target-state-config").read_text()) == config


def test_a_reboot_waits_for_the_apps_update_lock(device: Device) -> None:
    lock = device.tmp / "locks" / "7" / "main" / "updates.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    r = device.api.request("POST", "/v1/reboot", {})
    assert r.status == 423 and "updates.lock" in r.text


def test_nothing_listening_is_the_devices_fault(device: Device) -> None:
    def refused(port: int, timeout: float) -> socket.socket:
        raise ConnectionRefusedError("port 48484 on the device: Connect failed")

    device.api.dut.ssh.tcp = refused
    with pytest.raises(OSContractError, match="does not listen on port 48484"):
        device.api.healthy()


def test_a_connection_to_itself_is_let_go_at_once(device: Device) -> None:
    """A real TCP self-connect on loopback (what a client retrying a port nothing listens on
    can end in): the client hears its own request and says at once that nothing listens,
    instead of holding the port until its timeout. (The port then stays in TIME_WAIT for a
    minute, which only the device can prevent: the reference OS reserves 48484.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def self_connected(_port: int, timeout: float) -> socket.socket:
        s = socket.socket()
        s.settimeout(timeout)
        s.bind(("127.0.0.1", port))
        s.connect(("127.0.0.1", port))  # its own peer: nothing else listens there
        return s

    device.api.dut.ssh.tcp = self_connected
    started = time.monotonic()
    with pytest.raises(OSContractError, match=r"does not listen on port 48484.*reached itself"):
        device.api.request("GET", "/v1/healthy", timeout=30)
    assert time.monotonic() - started < 5, "the self-connected channel was held until timeout"


def test_a_pull_is_read_as_the_engine_streams_it(device: Device, tmp_path: Path) -> None:
    """``POST /images/create`` answers 200 and streams one JSON message a line: progress, then
    either the end or an error. The stand-in reads every line, and a message with ``error`` is a
    failed pull (an ``EngineError``), not a 200 taken for success."""
    import socketserver

    answers = [b'{"status":"Pulling from hil/busybox"}\n{"status":"Download complete"}\n',
               b'{"status":"Pulling from hil/busybox"}\n'
               b'{"errorDetail":{"message":"x509: unknown authority"},'
               b'"error":"x509: unknown authority"}\n']

    class Engine(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            body = answers.pop(0)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    sock = str(tmp_path / "engine.sock")
    server = socketserver.UnixStreamServer(sock, Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    device.mod.ENGINE_SOCKET = sock
    try:
        device.mod.pull("10.0.2.2:5000/hil/busybox:1")
        with pytest.raises(device.mod.EngineError, match="x509: unknown authority"):
            device.mod.pull("10.0.2.2:5000/hil/busybox:1")
    finally:
        server.shutdown()
        server.server_close()
