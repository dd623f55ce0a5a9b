"""Apps for the suites (containers, persistence), run the way a fleet runs them: a target
state given to the supervisor's local-mode API, and nothing else. The same calls run an app on
a real balenaOS device in development mode and on the reference OS.

Containers are reached with ``balena-engine exec`` on the host OS; what a test writes or reads
inside them is tagged so that the answer can be told apart from whatever else the shell prints.
"""

from __future__ import annotations

import shlex
from typing import Any

from hil.os import HostOS

APP_ID = "1001"
APP_NAME = "hil-app"
SERVICE = "main"
# label -> a file the app writes in its /data (its resin-data volume) and in its named volume
APP_VOLUMES = {"data": "/data/hil-persistence", "volume": "/vol/hil-persistence"}
SUPERVISOR_API = {"io.balena.features.supervisor-api": "1"}
# what a service runs: nothing but staying up (busybox's sleep takes no "infinity"), ending at
# once on SIGTERM as a well-behaved app does: PID 1 of a container has no default handlers, so a
# bare sleep would hold every engine stop (each reboot, each restart of the engine) for the
# engine's 10 s stop timeout until it is killed
KEEP_RUNNING = ["sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]


def service(image: str, **fields: Any) -> dict[str, Any]:
    """A service of a multi-container release: only what ``fields`` grant."""
    return {"serviceName": SERVICE, "image": image, "imageId": 1, "command": KEEP_RUNNING,
            "labels": dict(SUPERVISOR_API), "environment": {}, "volumes": [], **fields}


def release_service(image: str, **fields: Any) -> dict[str, Any]:
    """The service of a single-container release, as balena's builder composes one:
    privileged, on the host network, ``/data`` its ``resin-data`` volume; plus a named volume
    of the suite's own at ``/vol``."""
    return service(image, privileged=True, network_mode="host",
                   volumes=["resin-data:/data", "hil-vol:/vol"], **fields)


def target(services: dict[str, dict[str, Any]], *, app_id: str = APP_ID,
           name: str = APP_NAME, commit: str = "c1", config: dict[str, str] | None = None
           ) -> dict[str, Any]:
    """A local-mode target state with one app whose services are ``{name: service(...)}``."""
    svcs = {str(i + 1): {**s, "serviceName": n, "imageId": i + 1}
            for i, (n, s) in enumerate(services.items())}
    named = [v.split(":")[0] for s in services.values() for v in s["volumes"]]
    volumes: dict[str, dict[str, Any]] = {v: {} for v in named if not v.startswith("/")}
    return {"local": {"name": "hil-device", "config": config or {},
                      "apps": {app_id: {"name": name, "commit": commit, "releaseId": 1,
                                        "services": svcs, "volumes": volumes,
                                        "networks": {}}}},
            "dependent": {"apps": [], "devices": []}}


class Apps:
    def __init__(self, host_os: HostOS) -> None:
        self.os = host_os
        self.api = host_os.supervisor()

    def deploy(self, state: dict[str, Any], timeout: float = 600.0) -> dict[str, str]:
        """Make ``state`` the target (sent only if it differs) and wait until every service of
        its app runs: service name -> container ID."""
        self.api.wait_healthy()
        if self.api.target_state() != state:
            self.api.set_target_state(state)
        app = next(iter(state["local"]["apps"].values()))
        names = [s["serviceName"] for s in app["services"].values()]
        return self.api.wait_running(app["name"], names, timeout)

    def exec(self, container: str, script: str, timeout: float = 180.0) -> str:
        """Run ``script`` with sh in ``container``; its stdout (the engine's exit status must
        be 0: the script's own failures are for it to print)."""
        r = self.os.run(f"balena-engine exec {shlex.quote(container)} sh -c "
                        f"{shlex.quote(script)} 2>&1", timeout=timeout)
        assert r.ok, (f"`balena-engine exec` in container {container[:12]} failed "
                      f"(exit {r.exit_code}): {script}\n{r.stdout[-1500:]}")
        return r.stdout

    def env(self, container: str) -> dict[str, str]:
        out = self.exec(container, "env")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def marks(self, container: str, paths: dict[str, str]) -> dict[str, str | None]:
        """What each of ``paths`` (label -> file) holds in the container; None where absent."""
        script = "; ".join(f"printf '%s=%s\\n' {shlex.quote(k)} \"$(cat {shlex.quote(p)} "
                           "2>/dev/null || echo -)\"" for k, p in paths.items())
        got: dict[str, str | None] = {}
        for line in self.exec(container, script).splitlines():
            k, _, v = line.partition("=")
            if k in paths:
                got[k] = None if v == "-" else v
        return got

    def write_marks(self, container: str, paths: dict[str, str], value: str) -> None:
        """Write ``value`` to each file and sync, so a power cut cannot take it."""
        script = " && ".join(f"mkdir -p $(dirname {shlex.quote(p)}) && echo {value} > "
                             f"{shlex.quote(p)}" for p in paths.values())
        self.exec(container, f"{script} && sync && echo WROTE")

    def volumes_kept(self, after: str, value: str) -> str | None:
        """What broke the promise that the suites' app runs again after ``after`` (the
        supervisor may have recreated its container) with its /data and named volume holding
        ``value`` (``write_marks`` of APP_VOLUMES); None when it was kept."""
        running = self.api.wait_running(APP_NAME, [SERVICE])
        got = self.marks(running[SERVICE], APP_VOLUMES)
        if got == dict.fromkeys(APP_VOLUMES, value):
            return None
        return f"after {after} the app's /data and named volume should hold {value!r}; got {got}"

    def inspect(self, container: str, fmt: str) -> str:
        return self.os.check(f"balena-engine inspect --format {shlex.quote(fmt)} "
                             f"{shlex.quote(container)}", timeout=120).strip()

