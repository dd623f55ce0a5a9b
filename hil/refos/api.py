"""The host side of first-boot provisioning: a tiny registration endpoint on loopback, which
also serves os-config its service configuration (with the VPN's, when it has one:
``hil.refos.vpn``).

The guest reaches the host's loopback through QEMU user networking as 10.0.2.2, so a server on
127.0.0.1:<port> is ``http://10.0.2.2:<port>`` for the guest. Keys are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from hil.deadline import wait_until
from hil.errors import DeadlineError, NotReached
from hil.refos.vpn import VpnServer

log = logging.getLogger(__name__)

GUEST_HOST = "10.0.2.2"


@dataclass(frozen=True)
class Registration:
    """One accepted or refused registration request. ``device_api_key`` is the device's key:
    the one it sent (``api_key``, as balena's supervisor does) or else one the server issued
    (None when the request was refused); left out of repr so it cannot end up in a report."""

    uuid: str
    device_type: str
    auth_ok: bool
    application_id: Any = None
    device_api_key: str | None = field(default=None, repr=False)


class RegistrationServer:
    """``POST /device/register`` with ``Authorization: Bearer <provisioning key>`` and a JSON
    body ``{"uuid", "device_type", "api_key", ...}``, as balena's API takes it: answers 201
    ``{"id", "uuid", "api_key"}`` (the key the device sent, or a new one), 409 ``"uuid" must be
    unique.`` for a uuid already registered (``conflicts`` lists them: the device asked again),
    401 for a wrong key, 400 for a body without uuid. ``GET /v6/device?$filter=uuid eq '<uuid>'``
    (the supervisor's check that its key is known, after a 409) answers ``{"d": [{"id",
    "uuid"}]}`` to that device's key, ``{"d": []}`` otherwise. ``GET /ping`` answers ``OK``.

    ``GET /os/v1/config`` with ``Authorization: Bearer <a device key it issued>`` answers
    os-config's service configuration (401 otherwise): the ssh service's ``authorized_keys``
    hold ``cloud_key``, a balenaCloud account's key in balena's API; its private half stays in
    this process, for a test to log in with. ``config_fetches``: the uuids that fetched it.
    With ``vpn``, it also holds the openvpn service's client configuration and CA, and each
    registered device may log in to that VPN.

    Use as a context manager (it does not start or stop ``vpn``); ``port=0`` takes an
    ephemeral port.
    """

    def __init__(self, api_key: str | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, vpn: VpnServer | None = None) -> None:
        self.api_key = api_key or secrets.token_hex(16)
        self.vpn = vpn
        self.registrations: list[Registration] = []
        self.conflicts: list[str] = []
        self.config_fetches: list[str] = []
        import paramiko

        self.cloud_key: paramiko.PKey = paramiko.ECDSAKey.generate()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("registration server: %s", self.requestline)

            def _reply(self, code: int, body: dict[str, Any] | str) -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if isinstance(body, dict)
                                 else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path.rstrip("/") == "/ping":
                    self._reply(200, "OK")
                elif path.rstrip("/") == "/v6/device":
                    uuid = server._device(self.headers.get("Authorization", ""))
                    wanted = re.search(r"uuid%20eq%20'([0-9a-f]+)'|uuid eq '([0-9a-f]+)'", query)
                    found = wanted is not None and uuid in wanted.groups()
                    with server._lock:
                        ids = [i for i, r in enumerate(server.registrations, 1)
                               if found and r.uuid == uuid and r.auth_ok]
                    self._reply(200, {"d": [{"id": ids[0], "uuid": uuid}] if ids else []})
                elif self.path.rstrip("/") == "/os/v1/config":
                    uuid = server._device(self.headers.get("Authorization", ""))
                    if uuid is None:
                        self._reply(401, {"error": "unauthorized"})
                        return
                    with server._lock:
                        server.config_fetches.append(uuid)
                    self._reply(200, server.os_config())
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path.rstrip("/") not in ("/device/register", "/device/register/v2"):
                    self._reply(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._reply(400, {"error": "body is not JSON"})
                    return
                if not isinstance(body, dict) or not body.get("uuid"):
                    self._reply(400, {"error": "uuid missing"})
                    return
                auth = self.headers.get("Authorization", "")
                ok = secrets.compare_digest(auth, f"Bearer {server.api_key}")
                device_type = str(body.get("device_type") or body.get("deviceType") or "")
                uuid = str(body["uuid"])
                sent = body.get("api_key")
                key = (str(sent) if sent else secrets.token_hex(16)) if ok else None
                if not server._record(Registration(
                        uuid, device_type, ok, body.get("application", body.get("applicationId")),
                        key)):
                    log.info("registration of %s: 409, the uuid is registered", uuid)
                    self._reply(409, '"uuid" must be unique.')
                    return
                log.info("registration of %s (%s): %s", uuid, device_type,
                         "accepted" if ok else "refused (bad provisioning key)")
                if not ok:
                    self._reply(401, {"error": "unauthorized"})
                    return
                self._reply(201, {"id": len(server.registrations), "uuid": uuid,
                                  "api_key": key})

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    def os_config(self) -> dict[str, Any]:
        """What ``GET /os/v1/config`` answers: os-config's schema 1.0.0."""
        key = f"{self.cloud_key.get_name()} {self.cloud_key.get_base64()} balena-cloud-account"
        services: dict[str, Any] = {"ssh": {"authorized_keys": key}}
        if self.vpn is not None:
            services["openvpn"] = self.vpn.client_config(GUEST_HOST)
        return {"services": services, "schema_version": "1.0.0"}

    def _device(self, authorization: str) -> str | None:
        """The uuid of the device whose key (one this server issued) authorises a request."""
        with self._lock:
            return next((r.uuid for r in self.registrations if r.device_api_key
                         and secrets.compare_digest(authorization,
                                                    f"Bearer {r.device_api_key}")), None)

    def _record(self, reg: Registration) -> bool:
        """Keep ``reg``; False (a conflict, kept in ``conflicts``) when its uuid is registered
        already. One lock for the check and the append: concurrent requests cannot both win."""
        with self._cond:
            if reg.auth_ok and any(r.uuid == reg.uuid and r.auth_ok
                                   for r in self.registrations):
                self.conflicts.append(reg.uuid)
                return False
            self.registrations.append(reg)
            if self.vpn is not None and reg.device_api_key:
                # the VPN takes the device's key, and the provisioning key that registered it
                # (prepare-openvpn sends that one while config.json still holds it)
                self.vpn.allow(reg.uuid, reg.device_api_key)
                self.vpn.allow(reg.uuid, self.api_key)
            self._cond.notify_all()
            return True

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_for_guest(self) -> str:
        return f"http://{GUEST_HOST}:{self.port}"

    def start(self) -> RegistrationServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            name="hil-registration", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RegistrationServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def wait_for(self, uuid: str, timeout: float) -> Registration:
        """The first accepted registration of ``uuid``; ``NotReached`` (a test failure) after
        ``timeout``."""
        def probe() -> Registration | None:
            with self._lock:
                return next((r for r in self.registrations if r.uuid == uuid and r.auth_ok),
                            None)

        try:
            return wait_until(probe, timeout, f"registration of {uuid}",
                              seen=lambda: f"{len(self.registrations)} registration(s)",
                              interval=0.1)
        except DeadlineError as exc:  # the device did not register: its promise, not the rig's
            raise NotReached(f"the device to register as {uuid}", exc.seen, timeout) from None
