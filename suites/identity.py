"""The device's identity as the provisioning and rollback suites compare it across events: its
uuid, hostname, device API key and SSH host key, and how often the API accepted it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hil.dut import Dut
from hil.os import HostOS, Secret
from hil.session import HilSession

REGISTER_TIMEOUT = 120.0


@dataclass(frozen=True)
class Identity:
    uuid: str
    hostname: str
    device_api_key: Secret | None
    ssh_host_key: str | None

    def differences(self, other: Identity) -> list[str]:
        return [f"{name}: {getattr(self, name)!r} -> {getattr(other, name)!r}"
                for name in ("uuid", "hostname", "device_api_key", "ssh_host_key")
                if getattr(self, name) != getattr(other, name)]


def identity(dut: Dut, host_os: HostOS) -> Identity:
    cfg = host_os.config_json()
    key = cfg.get("deviceApiKey")
    return Identity(str(cfg.get("uuid")), host_os.hostname()[1],
                    key if isinstance(key, Secret) else None,
                    host_os.ssh_host_key() if dut.rig.network is not None else None)


def wait_registered(dut: Dut, host_os: HostOS) -> Secret:
    """The device's key, once config.json says the device is registered: balena's supervisor
    makes and stores the key first, and ``registered_at`` once the API has it."""
    last: list[Any] = [None, None]

    def probe() -> Secret | None:
        cfg = host_os.config_json()
        key = cfg.get("deviceApiKey")
        last[:] = [cfg.get("registered_at"), key]
        return key if isinstance(key, Secret) and cfg.get("registered_at") else None

    return dut.poll(probe, REGISTER_TIMEOUT, "config.json to hold registered_at and a "
                    "deviceApiKey (the device registered)",
                    lambda: f"registered_at={last[0]!r} deviceApiKey={last[1]!r}")


def accepted_registrations(session: HilSession, uuid: str) -> int:
    assert session.api is not None
    return len([r for r in session.api.registrations if r.uuid == uuid and r.auth_ok])


def identity_changes(after: str, was: Identity, now: Identity,
                     hil_session: HilSession) -> str | None:
    """What broke the promise that ``after`` leaves the identity as it was, or None."""
    diff = was.differences(now)
    if diff:
        return f"the device's identity changed after {after}: {'; '.join(diff)}"
    if hil_session.api is not None:
        n = accepted_registrations(hil_session, was.uuid)
        if n != 1:
            return f"the device registered again after {after} ({n} registrations)"
    return None
