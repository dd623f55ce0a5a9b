"""The balena Supervisor's device API (port 48484), as the suites use it: the same calls drive
the real supervisor on balenaOS and the reference OS's stand-in. The host reaches the API through
the device's SSH connection (local forwarding), so nothing but SSH has to be open.

Authentication is the supervisor's own: an unmanaged development device needs no key, a
production one the key a service gets in ``BALENA_SUPERVISOR_API_KEY``.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hil.errors import OSContractError

if TYPE_CHECKING:
    from hil.dut import Dut

PORT = 48484


@dataclass(frozen=True)
class Reply:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class _Forwarded(http.client.HTTPConnection):
    """An HTTP connection over an SSH channel instead of a TCP socket."""

    def __init__(self, channel: Any, timeout: float) -> None:
        super().__init__("127.0.0.1", PORT, timeout=timeout)
        self._channel = channel

    def connect(self) -> None:
        self.sock = self._channel


class SupervisorAPI:
    def __init__(self, dut: Dut) -> None:
        self.dut = dut

    def request(self, method: str, path: str, body: Any = None, *, key: str | None = None,
                timeout: float = 60.0) -> Reply:
        """One request. A refused connection is the device's fault (``OSContractError``);
        an SSH failure is the rig's (``InfraError``)."""
        try:
            channel = self.dut.ssh.tcp(PORT, timeout)
        except ConnectionRefusedError as exc:
            raise OSContractError(f"the supervisor API does not listen on port {PORT}: "
                                  f"{exc}") from None
        conn = _Forwarded(channel, timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.read().decode(errors="replace"))
        except (OSError, http.client.HTTPException) as exc:
            raise OSContractError(f"the supervisor API dropped `{method} {path}`: "
                                  f"{exc!r}") from None
        finally:
            conn.close()

    def healthy(self) -> Reply:
        return self.request("GET", "/v1/healthy")

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Until ``/v1/healthy`` answers 200 (the supervisor starts after the engine)."""
        seen = ["nothing yet"]

        def probe() -> bool:
            try:
                r = self.healthy()
            except AssertionError as exc:
                seen[0] = str(exc)
                return False
            seen[0] = f"{r.status} {r.text[:200]}"
            return r.status == 200

        self.dut.poll(probe, timeout, f"the supervisor healthy (GET :{PORT}/v1/healthy)",
                      lambda: seen[0], interval=2.0)

    def set_target_state(self, state: dict[str, Any]) -> None:
        """Local mode: the apps to run (``POST /v2/local/target-state``)."""
        r = self.request("POST", "/v2/local/target-state", state)
        _expect(r.status == 200 and r.json().get("status") == "success",
                f"the supervisor refused the target state: {r.status} {r.text[:500]}")

    def target_state(self) -> dict[str, Any]:
        r = self.request("GET", "/v2/local/target-state")
        _expect(r.status == 200, f"GET /v2/local/target-state: {r.status} {r.text[:500]}")
        state = r.json()["state"]
        assert isinstance(state, dict)
        return state

    def apps_state(self) -> dict[str, Any]:
        r = self.request("GET", "/v2/applications/state")
        _expect(r.status == 200, f"GET /v2/applications/state: {r.status} {r.text[:500]}")
        state = r.json()
        assert isinstance(state, dict)
        return state

    def wait_running(self, app: str, services: list[str], timeout: float = 600.0,
                     *, other_than: dict[str, str] | None = None) -> dict[str, str]:
        """Until every service of ``app`` runs (in a container other than ``other_than``'s,
        where given): service name -> container ID."""
        seen = ["nothing yet"]

        def probe() -> dict[str, str] | None:
            state = self.apps_state().get(app, {}).get("services", {})
            seen[0] = json.dumps(state)[:600]
            ids = {s: str(state.get(s, {}).get("containerId")) for s in services}
            running = all(state.get(s, {}).get("status") == "Running" for s in services)
            fresh = other_than is None or all(ids[s] != other_than.get(s) for s in services)
            return ids if running and fresh else None

        return self.dut.poll(probe, timeout, f"app {app}'s services {services} running",
                             lambda: seen[0], interval=3.0)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise OSContractError(message)
