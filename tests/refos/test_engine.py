"""balenaEngine on the reference OS, as balenaOS installs it: Debian's moby behind balenaOS's
names, socket, data root and health check, restarted when it exits. (The unit's watchdog killing
a hung engine is the containers suite's `test_hung_engine_is_killed_by_its_watchdog_and_comes_back`,
on both QEMU boards in `make test`.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from refos_guest import Guest, boot_dev, ssh_run

from hil.refos import appimage

pytestmark = pytest.mark.qemu

GuestFactory = Callable[..., Guest]
HEALTHY_TIMEOUT = 120.0  # boot to a healthy engine under TCG, with the other core busy


def wait_healthy(g: Guest, timeout: float = HEALTHY_TIMEOUT) -> float:
    """Seconds until /usr/lib/balena/balena-healthcheck passes (the command itself blocks
    while the engine starts: no sleep between tries is needed beyond its own run)."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        last = g.run("/usr/lib/balena/balena-healthcheck 2>&1; echo rc=$?", timeout=90,
                     check=False)
        if last.endswith("rc=0"):
            return time.monotonic() - t0
        g.run("sleep 1", check=False)
    raise AssertionError(f"balena-healthcheck did not pass within {timeout:.0f}s; last:\n"
                         f"{last}\n--- engine log ---\n"
                         + g.run("journalctl -u balena -n 20 --no-pager", check=False))


def test_engine_runs_as_on_balenaos_and_its_health_check_sees_it_fail(
        disk: Path, guest_factory: GuestFactory) -> None:
    g = boot_dev(guest_factory, disk)
    wait_healthy(g)
    assert g.run("balena-engine info --format '{{.DockerRootDir}} {{.Driver}}'") == (
        "/mnt/data/docker overlay2")
    assert g.run("test -S /var/run/balena-engine.sock && readlink /var/run/balena.sock") == (
        "balena-engine.sock")
    # development mode: the engine API answers on TCP 2375
    assert '"ApiVersion"' in g.run("wget -q -O - http://127.0.0.1:2375/version")
    # a container sees the device's /dev when privileged, and keeps /data-style volumes
    image = appimage.busybox(g.run("uname -m"))
    rc, out = ssh_run(g.ssh_port, "balena-engine load", timeout=300,
                      stdin=image.path.read_bytes())
    assert rc == 0, out
    g.run(f"balena run --rm -v hello:/vol {image.tag} sh -c 'echo Howdy > /vol/f && sync'",
          timeout=120)
    assert g.run("cat /mnt/data/docker/volumes/hello/_data/f") == "Howdy"
    assert g.run(f"balena run --rm --privileged {image.tag} "
                 "sh -c 'test -c /dev/watchdog0 && echo seen'", timeout=120) == "seen"

    # the same boot (each boot costs a minute under TCG): a hung engine fails the health
    # check, a killed one comes back. SIGSTOP: the engine is there but does not answer
    g.run("kill -STOP $(cat /var/run/balena-engine.pid)")
    out = g.run("timeout 10 /usr/lib/balena/balena-healthcheck >/dev/null 2>&1; echo rc=$?",
                timeout=30, check=False)
    assert out != "rc=0", "balena-healthcheck passed while the engine was stopped"
    # killed, systemd starts it again (balena.service's Restart=always)
    g.run("kill -CONT $(cat /var/run/balena-engine.pid); "
          "kill -KILL $(cat /var/run/balena-engine.pid)")
    wait_healthy(g)
