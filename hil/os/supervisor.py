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


def _exchange(channel: Any, request: bytes) -> Reply:
    """HTTP/1.0 over an SSH channel: send the request, read until the server closes.

    A connection to a port nothing listens on yet can connect to itself: a client retrying
    walks the kernel's ephemeral ports, and when it reaches the port it asks for, the socket
    is its own peer, hears its own request and holds the port, so the service starting there
    cannot bind it. Such an echo is taken as "nothing listens" and the channel let go at once.
    """
    channel.sendall(request)
    line = request.split(b"\r\n", 1)[0]
    data = b""
    while chunk := channel.recv(65536):
        data += chunk
        if len(data) >= len(line) and data.startswith(line):
            raise ConnectionRefusedError("the connection reached itself (its own request came "
                                         "back): nothing listens there yet")
    head, sep, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or not status[1].isdigit():
        raise http.client.BadStatusLine(head[:200].decode(errors="replace"))
    return Reply(int(status[1]), body.decode(errors="replace"))


def http_request(dut: Dut, port: int, method: str, path: str, body: Any = None, *,
                 key: str | None = None, timeout: float = 60.0) -> Reply:
    """One HTTP/1.0 request to ``port`` on the device, through its SSH connection.
    ``ConnectionRefusedError`` when nothing listens there; a dropped reply is the device's
    fault (``OSContractError``), an SSH failure the rig's (``InfraError``)."""
    with dut.rig.log.tally.timing("ssh"):  # waiting on the device, in the summary
        channel = dut.ssh.tcp(port, timeout)
        data = json.dumps(body).encode() if body is not None else b""
        headers = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1",
                   f"Content-Length: {len(data)}"]
        if body is not None:
            headers.append("Content-Type: application/json")
        if key is not None:
            headers.append(f"Authorization: Bearer {key}")
        try:
            return _exchange(channel, "\r\n".join(headers).encode() + b"\r\n\r\n" + data)
        except ConnectionRefusedError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise OSContractError(f"port {port} on the device dropped `{method} {path}`: "
                                  f"{exc!r}") from None
        finally:
            channel.close()


class SupervisorAPI:
    def __init__(self, dut: Dut) -> None:
        self.dut = dut

    def request(self, method: str, path: str, body: Any = None, *, key: str | None = None,
                timeout: float = 60.0) -> Reply:
        """One request. A refused connection is the device's fault (``OSContractError``),
        as is a dropped reply; an SSH failure is the rig's (``InfraError``)."""
        try:
            return http_request(self.dut, PORT, method, path, body, key=key, timeout=timeout)
        except ConnectionRefusedError as exc:
            raise OSContractError(f"the supervisor API does not listen on port {PORT}: "
                                  f"{exc}") from None

    def healthy(self) -> Reply:
        return self.request("GET", "/v1/healthy")

    def blink(self) -> Reply:
        """Identify the device: the supervisor blinks its LED (``LED_FILE``) for a while."""
        return self.request("POST", "/v1/blink")

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
            try:  # after a boot the supervisor starts after the engine: refused until then
                state = self.apps_state().get(app, {}).get("services", {})
            except OSContractError as exc:
                seen[0] = str(exc)
                return None
            seen[0] = json.dumps(state)[:600]
            ids = {s: str(state.get(s, {}).get("containerId")) for s in services}
            running = all(state.get(s, {}).get("status") == "Running" for s in services)
            fresh = other_than is None or all(ids[s] != other_than.get(s) for s in services)
            return ids if running and fresh else None

        # not faster: each look costs the device's CPU about a second (the supervisor asks the
        # engine), which slows the container starts waited for (docs/benchmarks.md)
        return self.dut.poll(probe, timeout, f"app {app}'s services {services} running",
                             lambda: seen[0], interval=3.0)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise OSContractError(message)
