"""The API's VPN on the host (``hil.refos.vpn``), with Debian's openvpn as the client: a device
the API registered logs in with its uuid and key under the configuration the API hands out (as
balena's API serves it); a wrong key is refused; no key reaches the server's logs. The device's
side (balenaOS's openvpn units, the rollback health check) is the rollback suite's, on both QEMU
boards."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.refos import RegistrationServer
from hil.refos.vpn import VpnServer, available

pytestmark = pytest.mark.skipif(available() is not None, reason=f"{available()}")


@pytest.fixture
def api() -> Iterator[RegistrationServer]:
    with VpnServer() as vpn, RegistrationServer(vpn=vpn) as server:
        yield server


def register(api: RegistrationServer, uuid: str, key: str) -> None:
    body = json.dumps({"uuid": uuid, "device_type": "generic-aarch64", "api_key": key}).encode()
    req = urllib.request.Request(f"{api.url}/device/register", body, method="POST", headers={
        "Authorization": f"Bearer {api.api_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as reply:
        assert reply.status == 201


def client(api: RegistrationServer, folder: Path, uuid: str, key: str) -> subprocess.Popen[bytes]:
    """openvpn with the device's configuration from the API, its files put under ``folder``:
    no tun device (``dev null``) and no user to drop to on the host."""
    served = api.os_config()["services"]["openvpn"]
    (folder / "ca.crt").write_text(served["ca"])
    auth = folder / "vpn-auth"
    auth.write_text(f"{uuid}\n{key}\n")
    auth.chmod(0o600)
    for script, body in (("up", "touch active"), ("down", "rm -f active")):
        (folder / f"{script}.sh").write_text(f"#!/bin/sh\ncd {folder} && {body}\n")
        (folder / f"{script}.sh").chmod(0o755)
    conf = (served["config"].replace("remote 10.0.2.2 ", "remote 127.0.0.1 ")
            .replace("/etc/openvpn/ca.crt", str(folder / "ca.crt"))
            .replace("/var/volatile/vpn-auth", str(auth))
            .replace("/etc/openvpn-misc/upscript.sh", str(folder / "up.sh"))
            .replace("/etc/openvpn-misc/downscript.sh", str(folder / "down.sh"))
            .replace("dev resin-vpn", "dev null").replace("user openvpn\ngroup openvpn\n", ""))
    (folder / "client.conf").write_text(conf)
    with (folder / "client.log").open("wb") as out:
        return subprocess.Popen([shutil.which("openvpn") or "openvpn", "--config", "client.conf"],
                                cwd=folder, stdout=out, stderr=subprocess.STDOUT)


def test_a_registered_device_logs_in_and_a_wrong_key_is_refused(
        api: RegistrationServer, tmp_path: Path) -> None:
    assert api.vpn is not None
    served = api.os_config()["services"]["openvpn"]
    # balena's API's client configuration, with the server the guest reaches
    assert f"\nremote 10.0.2.2 {api.vpn.port}\n" in served["config"]
    assert "\nauth-user-pass /var/volatile/vpn-auth\n" in served["config"]
    assert served["ca"].startswith("-----BEGIN CERTIFICATE-----")
    uuid, key = secrets.token_hex(16), secrets.token_hex(16)
    register(api, uuid, key)

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    procs = [client(api, good, uuid, key), client(api, bad, secrets.token_hex(16), key)]
    try:
        wait_until(lambda: (good / "active").exists() and uuid in api.vpn.connected(), 30,
                   "the registered device online (its up script ran, the server lists it)",
                   seen=lambda: f"server: {api.vpn.connected()}; client: "
                                f"{(good / 'client.log').read_text()[-800:]}")
        # auth-retry none: a refused login ends the client (systemd restarts it on a device)
        procs[1].wait(30)
        assert "AUTH_FAILED" in (bad / "client.log").read_text()
        assert not (bad / "active").exists()
        assert api.vpn.connected() == [uuid]
        procs[0].terminate()
        procs[0].wait(10)
        assert not (good / "active").exists()  # its down script ran
        logs = "".join(p.read_text(errors="replace") for p in api.vpn.dir.glob("*.log"))
        assert uuid in logs  # the server logs who logged in, never with what
        assert key not in logs and api.api_key not in logs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_login_check_takes_only_a_registered_uuid_with_its_key(
        api: RegistrationServer, tmp_path: Path) -> None:
    """The server's own check (openvpn passes it the login as a file), empty logins included,
    which openvpn clients refuse to send but a hostile one could."""
    assert api.vpn is not None
    uuid, key = secrets.token_hex(16), secrets.token_hex(16)
    register(api, uuid, key)

    def accepted(user: str, password: str) -> bool:
        login = tmp_path / "login"
        login.write_text(f"{user}\n{password}\n")
        return subprocess.run([str(api.vpn.dir / "login"), str(login)], timeout=10).returncode == 0

    assert accepted(uuid, key) and accepted(uuid, api.api_key)
    assert not any(accepted(u, k) for u, k in (("", ""), (uuid, ""), ("", key), (uuid, key[:-1]),
                                               (secrets.token_hex(16), key), (f"{uuid} {key}", "")))
    with pytest.raises(ValueError, match="a uuid and a key"):
        api.vpn.allow("", "")


def test_the_provisioning_key_logs_in_until_the_key_exchange(
        api: RegistrationServer, tmp_path: Path) -> None:
    """prepare-openvpn sends the provisioning key while config.json still holds it."""
    assert api.vpn is not None
    uuid = secrets.token_hex(16)
    register(api, uuid, secrets.token_hex(16))
    proc = client(api, tmp_path, uuid, api.api_key)
    try:
        wait_until(lambda: uuid in api.vpn.connected(), 30, "the device online",
                   seen=lambda: (tmp_path / "client.log").read_text()[-800:])
    finally:
        proc.kill()
        proc.wait()


def test_a_port_taken_before_the_server_listens_is_given_up_for_another() -> None:
    """The port is picked free, then listened on by socat: another process may take it in
    between (here, before the server starts)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with VpnServer(port=port) as vpn:
            assert vpn.port != port
            with socket.create_connection(("127.0.0.1", vpn.port), timeout=10):
                pass  # socat accepts, joined to the server's socket
