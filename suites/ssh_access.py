"""Root SSH access as a client tries it, for the suites that check who may log in: with a key
file or key, with no key and no password, or with a key the device never saw."""

from __future__ import annotations

from typing import Any

from hil.dut import Dut


def login(dut: Dut, *, key_file: str | None = None, pkey: Any = None,
          passwordless: bool = False) -> bool:
    """Whether root may log in over SSH this way (True), or is refused (False)."""
    import paramiko

    assert dut.rig.network is not None
    host, port = dut.rig.network.ssh_endpoint()
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        if passwordless:
            client.connect(host, port=port, username="root", password="", look_for_keys=False,
                           allow_agent=False, timeout=15, banner_timeout=15, auth_timeout=15)
        else:
            client.connect(host, port=port, username="root", key_filename=key_file, pkey=pkey,
                           look_for_keys=False, allow_agent=False, timeout=15,
                           banner_timeout=15, auth_timeout=15)
        _, out, _ = client.exec_command("true", timeout=15)
        return out.channel.recv_exit_status() == 0
    except paramiko.AuthenticationException:
        return False
    finally:
        client.close()


def passwordless(dut: Dut) -> bool:
    """Root login with no key and no password: the "none" method, then an empty password."""
    import paramiko

    assert dut.rig.network is not None
    host, port = dut.rig.network.ssh_endpoint()
    transport = paramiko.Transport((host, port))
    try:
        transport.start_client(timeout=15)
        try:
            transport.auth_none("root")
        except paramiko.BadAuthenticationType as exc:
            if "password" not in exc.allowed_types:
                return False
            try:
                transport.auth_password("root", "")
            except paramiko.AuthenticationException:
                return False
        except paramiko.AuthenticationException:
            return False
        return transport.is_authenticated()
    finally:
        transport.close()


def foreign_key() -> Any:
    import paramiko

    return paramiko.ECDSAKey.generate()
