"""Containers: the engine and the supervisor are up after boot, and an app deployed through the
supervisor's local-mode API gets what balenaOS promises app containers: its variables, `/data`
and named volumes kept across a restart, an app update, a reboot and a power cut, its own
filesystem kept across a reboot and a power cut (not recreated) but new after a restart or an
update, a supervisor API that needs the service's key on a production device and honours the
app's update lock, and another app purging the first one's volumes.

The same tests run on a real balenaOS device in development mode: they reach the device only
through `balena-engine` and the supervisor's API (the suite's README maps them to balenaOS's own
suites)."""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path
from typing import Any

import pytest
from apps import APP_ID, APP_NAME, SERVICE, Apps, release_service, service, target
from rig_http import served_token
from ssh_access import login, passwordless
from timers import assert_randomized

from hil.appregistry import AppRegistry
from hil.dut import Dut
from hil.errors import OSContractError
from hil.os import HostOS
from hil.refos import appimage

# label -> file inside the app's container
DATA = {"data": "/data/hil-mark", "volume": "/vol/hil-mark"}
OWN = {"container-fs": "/root/hil-mark", "tmp": "/tmp/hil-mark"}
VARIABLES = ("DEVICE_UUID", "DEVICE_TYPE", "DEVICE_NAME_AT_INIT", "APP_ID", "APP_NAME",
             "SERVICE_NAME", "HOST_OS_VERSION", "SUPERVISOR_ADDRESS", "SUPERVISOR_HOST",
             "SUPERVISOR_PORT", "SUPERVISOR_API_KEY", "SUPERVISOR_VERSION", "APP_LOCK_PATH")


def test_engine_is_healthy_after_boot(host_os: HostOS, app_image: str) -> None:
    r = host_os.run("/usr/lib/balena/balena-healthcheck", timeout=300)
    assert r.ok, f"balena-healthcheck failed after boot (exit {r.exit_code}):\n{r.stdout[-2000:]}"
    # and systemd's view, as balenaOS's own suite checks it
    state = host_os.run("systemctl is-active balena.service").stdout.strip()
    assert state == "active", f"balena.service is {state!r} after boot"
    # balenaOS keeps the engine's images and volumes on resin-data, in overlay2
    info = host_os.run("balena-engine info --format '{{.Driver}} {{.DockerRootDir}}'"
                       ).stdout.split()
    assert len(info) == 2 and info[0] == "overlay2", f"the engine's storage driver: {info}"
    same = host_os.run(f"[ $(stat -c %d {info[1]}) = $(stat -c %d /mnt/data) ] && echo yes")
    assert same.stdout.strip() == "yes", (
        f"the engine's root {info[1]} is not on the data partition (/mnt/data)")


def test_supervisor_is_healthy(host_os: HostOS, app_image: str) -> None:
    api = host_os.supervisor()
    api.wait_healthy()
    ping = api.request("GET", "/ping")
    assert (ping.status, ping.text) == (200, "OK"), f"GET /ping answered {ping}"


SUPERVISOR_TIMER = "update-balena-supervisor.timer"


def test_supervisor_update_timer_is_randomized(dut: Dut, host_os: HostOS) -> None:
    """balenaOS's supervisor update check runs from a timer with a random delay of up to an
    hour, so that a fleet does not ask at once: each time the timer is armed, its next
    trigger moves within that hour. (balenaOS's own test moves the clock by hours to re-arm
    it; restarting the timer re-arms it without touching the clock.)"""
    assert_randomized(dut, host_os, SUPERVISOR_TIMER, "1h")


def test_service_gets_the_balena_variables(host_os: HostOS, apps: Apps,
                                           app: dict[str, str]) -> None:
    env = apps.env(app[SERVICE])
    missing = [f"{p}_{v}" for v in VARIABLES for p in ("BALENA", "RESIN")
               if f"{p}_{v}" not in env]
    missing += [v for v in ("BALENA", "RESIN", "BALENA_SERVICE_HANDOVER_COMPLETE_PATH")
                if v not in env]
    assert not missing, f"the service lacks {missing}; it has {sorted(env)}"
    expected = {"BALENA_APP_ID": APP_ID, "BALENA_APP_NAME": APP_NAME,
                "BALENA_SERVICE_NAME": SERVICE, "BALENA": "1", "RESIN": "1",
                "BALENA_DEVICE_UUID": host_os.config_json().get("uuid"),
                "BALENA_DEVICE_TYPE": host_os.os_release().get("SLUG")}
    wrong = {k: (env.get(k), v) for k, v in expected.items() if env.get(k) != v}
    assert not wrong, f"variables with the wrong value (got, want): {wrong}"
    assert host_os.version() in env["BALENA_HOST_OS_VERSION"], (
        f"BALENA_HOST_OS_VERSION={env['BALENA_HOST_OS_VERSION']!r} does not name the OS "
        f"version {host_os.version()!r}")


def test_overlayfs_takes_another_mounts_upperdir_as_lowerdir(host_os: HostOS) -> None:
    """The kernel regression balenaOS's kernel-overlap test guards against: the engine stacks
    layers this way, and a kernel that refuses it ("lowerdir is in-use as upperdir/workdir")
    breaks image builds and deltas."""
    script = (
        "d=$(mktemp -d) && mkdir -p $d/lower $d/a/u $d/a/w $d/a/m $d/b/u $d/b/w $d/b/m && "
        "echo lower > $d/lower/f && mount -t overlay overlay -o "
        "lowerdir=$d/lower,upperdir=$d/a/u,workdir=$d/a/w $d/a/m && echo upper > $d/a/m/g && "
        "if mount -t overlay overlay -o lowerdir=$d/a/u,upperdir=$d/b/u,workdir=$d/b/w $d/b/m; "
        "then echo STACKED=$(cat $d/b/m/g); umount $d/b/m; "
        "else echo REFUSED; dmesg | grep -i overlayfs | tail -n 3; fi; "
        "umount $d/a/m; rm -rf $d")
    out = host_os.check(script, timeout=60)
    assert "STACKED=upper" in out, (
        f"overlayfs refused a lowerdir that is another mount's upperdir (the engine needs it):\n"
        f"{out}")


def test_container_healthcheck_goes_healthy_then_unhealthy(host_os: HostOS,
                                                           app_image: str) -> None:
    """A Dockerfile HEALTHCHECK, as the engine runs it: healthy while its check passes,
    unhealthy once it fails, each awaited as the engine's health_status event."""
    name = "hil-healthcheck"
    # all the container's events, not only health_status: the check's own exec events (one
    # per interval) make `events` write again after grep has its line, so it ends on SIGPIPE;
    # `timeout` ends `events` itself (no shell between them to leave it running)
    stream = ("balena-engine events --since $(cat /tmp/hil-health-since) "
              f"--filter container={name} --format " + "'{{.Status}}'")

    def awaited(state: str) -> str:
        return f"timeout 240 {stream} | grep -m 1 -x 'health_status: {state}'"

    seen = f"{stream} --until $(date +%s)"
    host_os.run(f"balena-engine rm -f {name} >/dev/null 2>&1; date +%s > /tmp/hil-health-since",
                timeout=120)
    try:
        host_os.check(f"balena-engine run -d --name {name} --health-cmd 'test -f /tmp/ok' "
                      "--health-interval 5s --health-retries 1 --health-timeout 20s "
                      f"{app_image} sh -c 'touch /tmp/ok; exec sleep 2147483647'", timeout=300)
        healthy = host_os.run(awaited("healthy"), timeout=300)
        assert healthy.ok, ("no health_status: healthy event within 240 s for a container "
                            "whose check passes; its events:\n"
                            + host_os.run(seen, timeout=120).stdout[-1500:])
        host_os.check(f"balena-engine exec {name} rm /tmp/ok", timeout=120)
        unhealthy = host_os.run(awaited("unhealthy"), timeout=300)
        assert unhealthy.ok, ("no health_status: unhealthy event within 240 s after the "
                              "container's check started failing; its events:\n"
                              + host_os.run(seen, timeout=120).stdout[-1500:])
    finally:
        host_os.run(f"balena-engine rm -f {name} >/dev/null 2>&1", timeout=120)


def test_time_in_the_container_is_the_hosts(host_os: HostOS, apps: Apps,
                                            app: dict[str, str]) -> None:
    inside = int(apps.exec(app[SERVICE], "date -u +%s").strip().splitlines()[-1])
    outside = int(host_os.check("date -u +%s").strip())
    assert abs(inside - outside) <= 5, (
        f"the container's clock says {inside}, the host's {outside} (a few seconds apart at "
        "most: the commands ran one after the other)")


def test_a_container_reaches_the_rig_host_through_the_engines_nat(
        dut: Dut, host_os: HostOS, app_image: str, tmp_path: Path) -> None:
    """balenaOS's firewall sanity check: the engine masquerades what its containers send out of
    any interface but its bridge (a nat rule for ``! -o balena0``); and through it a container
    on the engine's bridge (the default network; the suites' app uses the host's) fetches a
    file from the rig host."""
    rules = host_os.check("iptables -t nat -S POSTROUTING")
    nat = [r for r in rules.splitlines() if "! -o balena0" in r and r.endswith("-j MASQUERADE")]
    assert nat, ("the engine must masquerade its containers' traffic out of the device (a "
                 f"MASQUERADE rule for `! -o balena0` in nat POSTROUTING); it has:\n{rules}")
    network = dut.rig.network
    if network is None:
        pytest.skip("the rig has no network part: nothing on the rig host to reach")
    with served_token(network.host_address, tmp_path) as (token, url):
        # busybox's wget: no -T (its timeout option crashes this build); run has a deadline
        got = host_os.run(f"balena-engine run --rm --network bridge {shlex.quote(app_image)} "
                          f"wget -q -O- {shlex.quote(url)} 2>&1", timeout=180)
    assert token in got.stdout, (
        f"a container on the engine's bridge did not get {url} from the rig host through the "
        f"engine's NAT (exit {got.exit_code}): {got.stdout.strip()[-500:]}")


# from a container on the engine's bridge: the host's DNS server over TCP (the firewall lets
# only UDP 53 in from the bridge) and its SSH server (let in in every mode)
FIREWALL_PROBE = ("for p in 10.114.102.1:53 10.114.101.1:22222; do "
                  "if nc -w 10 ${p%:*} ${p#*:} </dev/null >/dev/null 2>&1; then echo $p=open; "
                  "else echo $p=closed; fi; done")


def test_supervisor_firewall_guards_the_host_in_the_configured_mode(
        dut: Dut, host_os: HostOS, apps: Apps, app: dict[str, str], app_image: str) -> None:
    """balenaOS's BALENA-FIREWALL test (the supervisor's chain is in place: more than ten
    lines of ``iptables -L BALENA-FIREWALL -vn``, and INPUT goes through it), and what the
    chain is for: with ``HOST_FIREWALL_MODE=on`` in the device's config a container on the
    engine's bridge no longer reaches the host's other services, with ``off`` (the default)
    it does; SSH stays open in both."""
    def chain() -> str:
        return host_os.check("iptables -t filter -L BALENA-FIREWALL -vn")

    dut.poll(lambda: len(chain().splitlines()) > 10, 60,
             "the supervisor's BALENA-FIREWALL chain (more than 10 lines)", chain)
    jumps = host_os.check("iptables -t filter -S INPUT")
    assert "-A INPUT -j BALENA-FIREWALL" in jumps.splitlines(), (
        "INPUT must send every packet through the supervisor's BALENA-FIREWALL; it has:\n"
        f"{jumps}")

    def reach(mode: str) -> dict[str, str]:
        apps.deploy(target({"main": release_service(app_image)},
                           config={"HOST_FIREWALL_MODE": mode} if mode != "off" else None))
        disabled = f"Firewall disabled ({mode})"
        dut.poll(lambda: (disabled in chain()) == (mode == "off"), 60,
                 f"the supervisor to apply firewall mode {mode}", chain)
        out = host_os.check(f"balena-engine run --rm --network bridge {shlex.quote(app_image)} "
                            f"sh -c {shlex.quote(FIREWALL_PROBE)}", timeout=180)
        return dict(line.split("=", 1) for line in out.split() if "=" in line)

    try:
        on = reach("on")
    finally:
        off = reach("off")
    assert on == {"10.114.102.1:53": "closed", "10.114.101.1:22222": "open"}, (
        f"with HOST_FIREWALL_MODE=on, want the host's DNS over TCP closed and SSH open to a "
        f"container; got {on}")
    assert off == {"10.114.102.1:53": "open", "10.114.101.1:22222": "open"}, (
        f"with the firewall off (the default), want both open to a container; got {off}")


def test_services_get_only_the_devices_they_are_granted(
        dut: Dut, apps: Apps, app_image: str) -> None:
    nodes = sorted(n for n in dut.rig.config.device_type.dev_nodes
                   if not n.startswith(("/dev/tty", "/dev/watchdog")))
    if not nodes:
        pytest.skip("the device type lists no /dev nodes besides consoles and watchdogs")
    granted = nodes[0]
    both = target({"plain": service(app_image),
                   "mapped": service(app_image, devices=[f"{granted}:{granted}"])},
                  app_id="1003", name="hil-devices")
    try:
        ids = apps.deploy(both)
        probe = " ".join(f"[ -e {n} ] && echo HAS={n};" for n in nodes) + " true"
        seen = {s: sorted(line.split("=", 1)[1] for line in apps.exec(ids[s], probe).splitlines()
                          if line.startswith("HAS="))
                for s in ("plain", "mapped")}
        assert seen == {"plain": [], "mapped": [granted]}, (
            f"of the device type's nodes {nodes}, an unprivileged service must see none and a "
            f"service granted {granted} exactly that one; they saw {seen}")
        opened = apps.exec(ids["mapped"], f"head -c 0 {granted} 2>&1 && echo OPENED")
        assert "OPENED" in opened, f"the granted {granted} does not open: {opened}"
    finally:
        apps.deploy(target({"main": release_service(app_image)}))


def test_release_image_is_pulled_from_the_rig_registry(
        host_os: HostOS, apps: Apps, app_registry: AppRegistry | None, app_image: str) -> None:
    """A release whose image the device lacks: the supervisor pulls it from the rig host's
    registry, over TLS whose CA the device trusts only through config.json's balenaRootCA."""
    if app_registry is None:
        pytest.skip("no registry the device can pull from (no rig network, or a config.json "
                    "without the session's CA): app images go over SSH")
    image = appimage.busybox(host_os.check("uname -m").strip())
    ref = app_registry.push(image.path, f"hil/registry-check:{secrets.token_hex(4)}")
    fresh = target({"main": service(ref)}, app_id="1004", name="hil-registry")
    try:
        ids = apps.deploy(fresh)
        got = apps.inspect(ids[SERVICE], "{{.Image}}")
        assert got == image.id, (f"the service runs image {got}, not the {image.id} pushed to "
                                 f"the registry as {ref}")
    finally:
        apps.deploy(target({"main": release_service(app_image)}))
        host_os.run(f"balena-engine rmi {shlex.quote(ref)} >/dev/null 2>&1", timeout=120)


def test_restart_request_recreates_the_container_and_keeps_its_volumes(
        host_os: HostOS, apps: Apps, app: dict[str, str]) -> None:
    apps.write_marks(app[SERVICE], {**DATA, **OWN}, "before-restart")
    r = apps.api.request("POST", "/v1/restart", {"appId": int(APP_ID)})
    assert r.status == 200, f"POST /v1/restart answered {r}"
    new = apps.api.wait_running(APP_NAME, [SERVICE], other_than=app)
    got = apps.marks(new[SERVICE], {**DATA, **OWN})
    assert got == {"data": "before-restart", "volume": "before-restart",
                   "container-fs": None, "tmp": None}, (
        f"after a restart request (a new container), want /data and the volume kept and the "
        f"container's own files gone; got {got}")


def test_app_update_recreates_the_container_and_keeps_its_volumes(
        apps: Apps, app: dict[str, str], app_image: str) -> None:
    apps.write_marks(app[SERVICE], {**DATA, **OWN}, "before-update")
    updated = target({"main": release_service(app_image, environment={"HIL_RELEASE": "2"})},
                     commit="c2")
    apps.api.set_target_state(updated)
    try:
        new = apps.api.wait_running(APP_NAME, [SERVICE], other_than=app)
        assert apps.env(new[SERVICE]).get("HIL_RELEASE") == "2", (
            "the updated service does not have the new release's variable")
        got = apps.marks(new[SERVICE], {**DATA, **OWN})
        assert got == {"data": "before-update", "volume": "before-update",
                       "container-fs": None, "tmp": None}, (
            f"after an app update, want /data and the volume kept and the container new; "
            f"got {got}")
    finally:
        apps.api.set_target_state(target({"main": release_service(app_image)}))


def test_device_and_service_variables_reach_their_services(
        apps: Apps, app_image: str) -> None:
    """A device variable reaches every service of the app, a service variable only its own;
    a change recreates only the services whose environment changed. In local mode there is no
    cloud to merge the two levels: the target state carries each service's resulting
    `environment`, as the cloud's target state does."""
    device = {"HIL_DEVICE_VAR": secrets.token_hex(4)}
    only_a = {"HIL_SERVICE_VAR": secrets.token_hex(4)}

    def two(a_env: dict[str, str]) -> dict[str, Any]:
        return target({"a": service(app_image, environment=a_env),
                       "b": service(app_image, environment=dict(device))},
                      app_id="1005", name="hil-variables")
    try:
        first = apps.deploy(two(dict(device)))
        seen = {s: {k: apps.env(first[s]).get(k) for k in (*device, *only_a)} for s in first}
        want = {s: {**device, **dict.fromkeys(only_a)} for s in first}
        assert seen == want, f"a device variable must reach both services: {seen}"
        apps.api.set_target_state(two({**device, **only_a}))
        changed = apps.api.wait_running("hil-variables", ["a"], other_than={"a": first["a"]})
        state = apps.api.apps_state()["hil-variables"]["services"]
        kept = {s: (state[s]["containerId"], state[s]["status"]) for s in ("a", "b")}
        assert kept["b"] == (first["b"], "Running"), (
            f"service b's environment did not change, yet its container did (was "
            f"{first['b'][:12]}, now {str(kept['b'][0])[:12]} {kept['b'][1]})")
        seen = {s: {k: apps.env(c).get(k) for k in (*device, *only_a)}
                for s, c in (("a", changed["a"]), ("b", first["b"]))}
        want = {"a": {**device, **only_a}, "b": {**device, **dict.fromkeys(only_a)}}
        assert seen == want, f"a service variable must reach only its own service: {seen}"
    finally:
        apps.deploy(target({"main": release_service(app_image)}))


# balenaOS's extra firmware: the supervisor keeps an engine volume, names it in config.json's
# os.kernel.extraFirmwareVol and mounts it in services labelled io.balena.features.extra-firmware;
# the OS's os-extra-firmware points the kernel's firmware loader at it (sysfs now, the kernel
# command line from the next boot on)
EXTRA_FIRMWARE_VOLUME = "extra-firmware"
FIRMWARE_LABEL = {"io.balena.features.extra-firmware": "1"}
FIRMWARE_SEARCH_PATH = "/sys/module/firmware_class/parameters/path"
# the kernel's own firmware-loader test driver: a name written to trigger_request is requested
# (request_firmware), and /dev/test_firmware gives what was loaded (nothing after a failure)
FIRMWARE_TRIGGER = "/sys/devices/virtual/misc/test_firmware/trigger_request"
FIRMWARE_APPLY = 60  # s from the target state to the OS pointing the kernel at the volume
BOOT_EXTRA_ENV = "/mnt/boot/extra_uEnv.txt /mnt/boot/grub/grub_extraenv"


def _request_firmware(host_os: HostOS, name: str) -> tuple[str, str]:
    """The kernel asked for firmware ``name``: (what it loaded, "" if it found none; the
    kernel's own lines about it)."""
    out = host_os.check(
        f"printf %s {shlex.quote(name)} > {FIRMWARE_TRIGGER} 2>/dev/null; "
        f"echo \"loaded=$(cat /dev/test_firmware)\"; dmesg | grep -F {shlex.quote(name)} | "
        "tail -n 2", timeout=60)
    loaded = next((ln[len("loaded="):] for ln in out.splitlines() if ln.startswith("loaded=")),
                  "")
    return loaded, "\n".join(ln for ln in out.splitlines() if not ln.startswith("loaded="))


def test_firmware_from_the_extra_firmware_volume_reaches_the_kernel(
        dut: Dut, host_os: HostOS, apps: Apps, app_image: str, app: dict[str, str]) -> None:
    """balenaOS's extra-firmware test: a firmware file a labelled service writes into the
    supervisor's extra firmware volume is found by the kernel (not before it is there), the
    OS's os-extra-firmware having pointed the loader at the volume; after a reboot the kernel
    command line carries the path (the bootloader's extra environment) and the file still
    loads. Theirs builds a module that requests the firmware; this one uses the kernel's own
    test_firmware."""
    if not host_os.run("modprobe test_firmware", timeout=60).ok:
        pytest.skip("the device's kernel has no test_firmware module (CONFIG_TEST_FIRMWARE): "
                    "the check needs a module that requests firmware by name")
    token = secrets.token_hex(4)
    name, content = f"hil-fw-{token}.bin", f"balena hil {token}"
    loaded, kernel = _request_firmware(host_os, name)
    assert loaded == "", (f"firmware {name} loaded before any service provided it: {loaded!r}; "
                          f"the kernel said:\n{kernel}")
    firmware = service(app_image, labels={**FIRMWARE_LABEL}, command=[
        "sh", "-c", f"printf %s {shlex.quote(content)} > /extra-firmware/{name} && "
        "trap 'exit 0' TERM; sleep 2147483647 & wait"])
    main_only = target({SERVICE: release_service(app_image)})
    mountpoint = ""
    try:
        apps.deploy(target({SERVICE: release_service(app_image), "firmware": firmware}))
        mountpoint = host_os.check(f"balena-engine volume inspect {EXTRA_FIRMWARE_VOLUME} "
                                   "--format '{{.Mountpoint}}'", timeout=120).strip()
        assert mountpoint, f"the supervisor keeps no {EXTRA_FIRMWARE_VOLUME} volume"

        def named() -> bool:
            os_conf = host_os.config_json().get("os")
            kernel_conf = os_conf.get("kernel") if isinstance(os_conf, dict) else None
            return (isinstance(kernel_conf, dict)
                    and kernel_conf.get("extraFirmwareVol") == EXTRA_FIRMWARE_VOLUME)

        dut.poll(named, FIRMWARE_APPLY, f"config.json's os.kernel.extraFirmwareVol to name the "
                 f"{EXTRA_FIRMWARE_VOLUME} volume (the supervisor sets it)",
                 lambda: str(host_os.config_json().get("os")))
        dut.poll(lambda: host_os.run(
                     f"cat {FIRMWARE_SEARCH_PATH}; systemctl show -p Result --value "
                     "os-extra-firmware.service", read_only=True).stdout.split()
                 == [mountpoint, "success"], FIRMWARE_APPLY,
                 f"the kernel's firmware search path ({FIRMWARE_SEARCH_PATH}) to be the "
                 f"{EXTRA_FIRMWARE_VOLUME} volume's mountpoint {mountpoint}, set by "
                 "os-extra-firmware.service (Result=success)",
                 lambda: host_os.run(f"cat {FIRMWARE_SEARCH_PATH}; systemctl status --no-pager "
                                     "os-extra-firmware.service | tail -n 5").stdout)
        dut.poll(lambda: host_os.run(f"cat {mountpoint}/{name}",
                                     read_only=True).stdout == content, FIRMWARE_APPLY,
                 f"the labelled service to write {name} into the volume, at {mountpoint}",
                 lambda: host_os.run(f"ls -l {mountpoint}").stdout)
        loaded, kernel = _request_firmware(host_os, name)
        assert loaded == content, (
            f"the kernel did not load {name} from the extra firmware volume {mountpoint} "
            f"(got {loaded!r}, want {content!r}); the kernel said:\n{kernel}")
        apps.deploy(main_only)  # the file stays: the volume is the OS's, not the service's
        boot_env = host_os.run(f"cat {BOOT_EXTRA_ENV} 2>/dev/null | tr -d '\\000' | "
                               "grep -v '^#'", read_only=True).stdout.strip()
        dut.reboot()
        cmdline = host_os.check("cat /proc/cmdline", read_only=True).strip()
        assert f"firmware_class.path={mountpoint}" in cmdline.split(), (
            f"after a reboot the kernel command line lacks firmware_class.path={mountpoint}: "
            f"{cmdline!r} (the bootloader's extra environment held {boot_env!r})")
        search = host_os.check(f"cat {FIRMWARE_SEARCH_PATH}", read_only=True).strip()
        assert search == mountpoint, f"after a reboot the firmware search path is {search!r}"
        host_os.check("modprobe test_firmware", timeout=60)
        loaded, kernel = _request_firmware(host_os, name)
        assert loaded == content, (
            f"after a reboot the kernel did not load {name} from {mountpoint} (got {loaded!r});"
            f" the kernel said:\n{kernel}")
    finally:
        if mountpoint:
            host_os.run(f"rm -f {mountpoint}/{name}")
        host_os.run("rmmod test_firmware")
        apps.deploy(main_only)


# balena.service's watchdog, shortened as balenaOS's own test does it: a runtime drop-in. (30 s,
# not their 15: each health check starts two programs, seconds each under QEMU's emulation.)
WATCHDOG_DROPIN = "/run/systemd/system/balena.service.d/override.conf"
WATCHDOG_SEC = 30
WATCHDOG_FIRED = "balena.service: Failed with result 'watchdog'"


def test_hung_engine_is_killed_by_its_watchdog_and_comes_back(
        dut: Dut, host_os: HostOS, app_image: str) -> None:
    """The engine's containerd stopped (SIGSTOP): the engine's health check hangs, the unit's
    watchdog kills the engine and it starts again. Before the reboot tests below: the drop-in
    lives in /run, so the next boot brings back the period balenaOS ships (360 s)."""
    host_os.check(f"mkdir -p $(dirname {WATCHDOG_DROPIN}) && "
                  f"printf '[Service]\\nWatchdogSec={WATCHDOG_SEC}\\n' > {WATCHDOG_DROPIN}")
    try:
        host_os.restart_engine()  # the drop-in counts from the engine's start
        fired_before = host_os.engine_log().count(WATCHDOG_FIRED)
        host_os.hang_engine()
        dut.poll(lambda: host_os.engine_log().count(WATCHDOG_FIRED) > fired_before,
                 2 * WATCHDOG_SEC + 60,
                 f"the watchdog ({WATCHDOG_SEC} s) to kill the hung engine ({WATCHDOG_FIRED!r} "
                 "in balena.service's log)", lambda: host_os.engine_log()[-1500:], interval=5.0)
        host_os.wait_engine()
    finally:
        host_os.check(f"rm -f {WATCHDOG_DROPIN}")


HEALTHDOG_OFF = "/run/systemd/system/balena.service.d/hil-healthdog-off.conf"
# three runs in a row, as balenaOS's test times them (by the uptime clock: busybox's date has
# no %N); the first failing run's output
HEALTHCHECK_THRICE = ("read -r s _ < /proc/uptime; for i in 1 2 3; do "
                      "/usr/lib/balena/balena-healthcheck >/run/hil-healthcheck.out 2>&1 || "
                      "{ echo \"fail $i: $(tail -c 600 /run/hil-healthcheck.out)\"; exit 0; }; "
                      "done; read -r e _ < /proc/uptime; echo \"ok $s $e\"")


def test_engine_health_check_runs_within_the_device_types_budget(
        dut: Dut, host_os: HostOS) -> None:
    """balenaOS's performance check of balena-healthcheck: three runs in a row within the
    device type's limit (a Pi 3: 5 s), the engine's own watchdog check switched off meanwhile
    so that it cannot compete. Types balenaOS has no figures for are not timed, as in theirs."""
    dtype = dut.rig.config.device_type
    budget = dtype.engine_healthcheck_budget
    if budget is None:
        pytest.skip(f"device type {dtype.slug} sets no engine_healthcheck_budget (balenaOS "
                    "times the engine's health check only on types it has figures for)")
    host_os.check(f"mkdir -p $(dirname {HEALTHDOG_OFF}) && printf '[Service]\\n"
                  f"Environment=BALENAD_HEALTHDOG_HEALTHCHECK=/bin/true\\n' > {HEALTHDOG_OFF}")
    try:
        host_os.restart_engine()
        word, *rest = host_os.check(HEALTHCHECK_THRICE, timeout=max(120.0, 10 * budget)).split(
            " ", 1)
        assert word == "ok", f"balena-healthcheck failed on run {' '.join(rest)}"
        start, end = (float(t) for t in rest[0].split())
        assert end - start < budget, (
            f"three balena-healthcheck runs took {end - start:.2f} s; balenaOS's limit for "
            f"{dtype.slug} is {budget:g} s")
    finally:
        host_os.check(f"rm -f {HEALTHDOG_OFF}")
        host_os.restart_engine()


def _assert_survived(how: str, apps: Apps, app: dict[str, str], mark: str) -> None:
    """The same container (not recreated) runs again after ``how``, with every file the app
    wrote (``mark``, fsync'd) in /data, its named volume, its own filesystem and /tmp."""
    after = apps.api.wait_running(APP_NAME, [SERVICE])
    assert after == app, (f"the app's container was recreated by {how} (was {app}, now "
                          f"{after}): its own filesystem is lost")
    got = apps.marks(after[SERVICE], {**DATA, **OWN})
    assert got == dict.fromkeys([*DATA, *OWN], mark), (
        f"after {how}, want every file the app wrote kept; got {got}")


def test_container_and_its_files_survive_a_power_cut(dut: Dut, apps: Apps,
                                                     app: dict[str, str]) -> None:
    """The same for a reboot: test_update_lock_holds_a_reboot_until_released (one reboot
    under QEMU's emulation costs half a minute)."""
    apps.write_marks(app[SERVICE], {**DATA, **OWN}, "before-power-cut")
    dut.power_cycle()
    _assert_survived("a power cut", apps, app, "before-power-cut")


def test_production_mode_at_runtime_closes_the_engine_api_and_asks_for_keys(
        dut: Dut, host_os: HostOS, apps: Apps, app: dict[str, str]) -> None:
    """developmentMode switched off and on at runtime, as a fleet does it: in production the
    engine's API on TCP 2375 is closed, root SSH needs a key and the supervisor's API the
    service's key; back in development mode the engine's API answers again."""
    assert host_os.engine_tcp_api() == "OK", (
        "a development device's engine must answer on TCP 2375 (GET /_ping); it answered "
        f"{host_os.engine_tcp_api()!r}")
    key = apps.env(app[SERVICE])["BALENA_SUPERVISOR_API_KEY"]
    host_os.set_config(developmentMode=False)
    try:
        last = ["nothing yet"]

        def refused() -> bool:
            try:
                status = apps.api.request("GET", "/v2/applications/state").status
            except OSContractError as exc:  # restarted with the engine it requires
                last[0] = str(exc)
                return False
            last[0] = f"it answered {status} without one"
            return status == 401
        dut.poll(refused, 120, "the supervisor to ask for a key on a production device",
                 lambda: last[0])
        dut.poll(lambda: host_os.engine_tcp_api() is None, 300,
                 "the engine to stop its API on TCP 2375 (production)",
                 lambda: f"GET /_ping on 2375 answered {host_os.engine_tcp_api()!r}")
        host_os.wait_engine()  # restarted
        assert host_os.engine_tcp_api() is None, (
            "the engine restarted in production with its API open on TCP 2375")
        apps.api.wait_healthy()  # and the supervisor after it
        dut.poll(lambda: not passwordless(dut), 60,
                 "root SSH without a key to be refused on a production device",
                 lambda: "a login with no key and no password still succeeds")
        assert login(dut, key_file=str(dut.ssh_key)), (
            "a production device refused the key from os.sshKeys")
        wrong = apps.api.request("GET", "/v2/applications/state", key="0" * 32)
        assert wrong.status == 401, f"a wrong key was let through: {wrong.status}"
        right = apps.api.request("GET", "/v2/applications/state", key=key)
        assert right.status == 200 and APP_NAME in right.json(), (
            f"the service's own key was refused: {right}")
        # the engine's restart stopped the container; its restart policy starts it again (the
        # supervisor's state is not read here: it asks for a key now)
        dut.poll(lambda: apps.inspect(app[SERVICE], "{{.State.Running}}") == "true", 300,
                 "the app's container running again after the engine's restart",
                 lambda: apps.inspect(app[SERVICE], "{{.State.Status}}"), interval=3.0)
        inside = apps.exec(app[SERVICE], 'wget -q -O- --header "Authorization: Bearer '
                           '$BALENA_SUPERVISOR_API_KEY" "$BALENA_SUPERVISOR_ADDRESS'
                           '/v2/applications/state"')
        assert APP_NAME in inside, f"the API refused the service from inside: {inside[-500:]}"
    finally:
        host_os.via_ssh().set_config(developmentMode=True)
    dut.poll(lambda: host_os.engine_tcp_api() == "OK", 300,
             "the engine's API on TCP 2375 back in development mode",
             lambda: f"GET /_ping on 2375 answered {host_os.engine_tcp_api()!r}")


def test_update_lock_holds_a_reboot_until_released(
        dut: Dut, apps: Apps, app: dict[str, str]) -> None:
    """While the app holds its update lock its reboot request gets 423 Locked; released, the
    same request reboots the device, and the app's container and files survive the reboot."""
    reboot = ('wget -q -O- --header "Authorization: Bearer $BALENA_SUPERVISOR_API_KEY" '
              '--post-data "{}" "$BALENA_SUPERVISOR_ADDRESS/v1/reboot" 2>&1; echo "wget=$?"')
    apps.exec(app[SERVICE], 'mkdir -p /tmp/balena && touch "$BALENA_APP_LOCK_PATH"')
    try:
        held = apps.exec(app[SERVICE], reboot)
        assert "wget=0" not in held and "423" in held, (
            f"want 423 Locked for a reboot while the app holds its update lock; got {held}")
    finally:
        apps.exec(app[SERVICE], 'rm -f "$BALENA_APP_LOCK_PATH"')
    boot = dut.boot_id()
    apps.write_marks(app[SERVICE], {**DATA, **OWN}, "before-reboot")
    at = dut.start_reboot(f"balena-engine exec {app[SERVICE]} sh -c {shlex.quote(reboot)}")
    dut.await_boot(at)
    dut.wait_ready()
    assert dut.boot_id() != boot, "the lock was released, yet the app's reboot request did nothing"
    _assert_survived("the reboot it asked for", apps, app, "before-reboot")


def test_override_lock_lets_a_restart_through_the_apps_lock(
        apps: Apps, app: dict[str, str], app_image: str) -> None:
    apps.exec(app[SERVICE], 'mkdir -p /tmp/balena && touch "$BALENA_APP_LOCK_PATH"')
    restart = {"appId": int(APP_ID)}
    try:
        held = apps.api.request("POST", "/v1/restart", restart)
        assert held.status == 423, (f"a restart request went through the app's update lock: "
                                    f"{held.status} {held.text[:300]}")
        apps.api.set_target_state(target({"main": release_service(app_image)},
                                         config={"SUPERVISOR_OVERRIDE_LOCK": "1"}))
        through = apps.api.request("POST", "/v1/restart", restart)
        assert through.status == 200, (
            f"with SUPERVISOR_OVERRIDE_LOCK=1 the restart was still refused: {through.status} "
            f"{through.text[:300]}")
        apps.api.wait_running(APP_NAME, [SERVICE], other_than=app)
    finally:
        # the lock's directory outlives the container: on the host, where the supervisor
        # keeps every service's (balenaOS's layout too)
        apps.os.run(f"rm -f /tmp/balena-supervisor/services/{APP_ID}/{SERVICE}/updates.lock")
        apps.api.set_target_state(target({"main": release_service(app_image)}))


SAFE_REBOOT = "/usr/libexec/safe_reboot"
HOLDER = "/tmp/hil-lock-holder"  # the pid of whatever holds the app's update lock
WAITER = "/tmp/hil-safe-reboot"  # the pid of a safe_reboot that waits


def _hold_the_apps_lock(dut: Dut, host_os: HostOS) -> str:
    """An exclusive flock on the suite app's updates.lock, held until its holder is killed
    (on the host, as balenaOS's own test holds one); the lock's path, once it is held."""
    lock = f"/tmp/balena-supervisor/services/{APP_ID}/{SERVICE}/updates.lock"
    # -w: the supervisor takes the lock for a moment whenever it applies the target state
    host_os.check(f"mkdir -p $(dirname {lock}) && ( flock -w 20 -x 9 && exec sleep 2147483647 ) "
                  f"9>{lock} </dev/null >/dev/null 2>&1 & echo $! > {HOLDER}")
    dut.poll(lambda: not host_os.run(f"flock -n -x {lock} true").ok, 30,
             f"the test's holder to take {lock}", lambda: "another flock still gets it")
    return lock


def test_safe_reboot_waits_while_an_app_holds_its_lock(
        dut: Dut, host_os: HostOS, app: dict[str, str]) -> None:
    """balenaOS's safe_reboot (used for host OS updates and reboots the OS asks for): it
    waits, saying so, while an app holds its update lock, and reboots once it is released."""
    boot = dut.boot_id()
    lock = _hold_the_apps_lock(dut, host_os)
    mark = host_os.log_mark()
    try:
        host_os.check(f"sh -c {SAFE_REBOOT} </dev/null >/dev/null 2>&1 & echo $! > {WAITER}")
        last = [""]

        def waiting() -> bool:
            last[0] = host_os.log_since(mark)
            return f"{lock} exists, busy waiting on unlocking for reboot." in last[0]

        dut.poll(waiting, 60, f"safe_reboot to wait for the app's lock ({lock})",
                 lambda: last[0][-2000:] or "(nothing logged)", interval=2.0)
        assert dut.boot_id() == boot, "safe_reboot rebooted while the app held its lock"
    except BaseException:
        host_os.run(f"kill $(cat {WAITER}) $(cat {HOLDER})")
        raise
    at = dut.start_reboot(f"kill $(cat {HOLDER})")
    dut.await_boot(at)
    dut.wait_ready()
    assert dut.boot_id() != boot, "the lock was released, yet safe_reboot did not reboot"


def test_safe_reboot_goes_through_the_lock_with_the_override(
        dut: Dut, host_os: HostOS, apps: Apps, app: dict[str, str], app_image: str) -> None:
    boot = dut.boot_id()
    apps.api.set_target_state(target({"main": release_service(app_image)},
                                     config={"SUPERVISOR_OVERRIDE_LOCK": "true"}))
    try:
        _hold_the_apps_lock(dut, host_os)
        at = dut.start_reboot(f"sh -c {SAFE_REBOOT} </dev/null >/dev/null 2>&1 &")
        dut.await_boot(at)
        dut.wait_ready()
        assert dut.boot_id() != boot, (
            "with SUPERVISOR_OVERRIDE_LOCK=true, safe_reboot did not reboot through the lock")
    finally:
        apps.api.wait_healthy()
        apps.api.set_target_state(target({"main": release_service(app_image)}))


def _release_the_apps_lock(host_os: HostOS, lock: str) -> None:
    """The holder killed and the file removed: what a lockfile's unlock does (the supervisor
    counts the file, whoever holds it; safe_reboot the flock)."""
    host_os.check(f"kill $(cat {HOLDER}) 2>/dev/null; rm -f {lock}")


def test_update_lock_holds_back_a_new_release_until_released_or_overridden(
        dut: Dut, host_os: HostOS, apps: Apps, app: dict[str, str], app_image: str) -> None:
    """A new release while the app holds its update lock: the old container keeps running and
    the supervisor logs that updates are locked; released, the release goes through; held
    again, `BALENA_SUPERVISOR_OVERRIDE_LOCK=1` in the device's config lets the next one
    through the lock."""
    def release(value: str, config: dict[str, str] | None = None) -> dict[str, Any]:
        return target({"main": release_service(app_image, environment={"HIL_RELEASE": value})},
                      commit=f"c-{value}", config=config)
    lock = _hold_the_apps_lock(dut, host_os)
    mark = host_os.log_mark()
    try:
        apps.api.set_target_state(release("locked"))
        last = [""]

        def says_locked() -> bool:
            last[0] = host_os.log_since(mark)
            return "Updates are locked" in last[0]
        dut.poll(says_locked, 120, "the supervisor to log that updates are locked",
                 lambda: last[0][-2000:] or "(nothing logged)", interval=5.0)
        running = apps.inspect(app[SERVICE], "{{.State.Running}}")
        assert running == "true", (
            f"the app's container is no longer running ({running}) while it holds its lock")
        assert "HIL_RELEASE" not in apps.env(app[SERVICE]), "the old container changed"
        _release_the_apps_lock(host_os, lock)
        second = apps.api.wait_running(APP_NAME, [SERVICE], other_than=app)
        assert apps.env(second[SERVICE]).get("HIL_RELEASE") == "locked", (
            "once the lock was released the held-back release did not run")
        _hold_the_apps_lock(dut, host_os)
        apps.api.set_target_state(
            release("override", config={"BALENA_SUPERVISOR_OVERRIDE_LOCK": "1"}))
        third = apps.api.wait_running(APP_NAME, [SERVICE], other_than=second)
        assert apps.env(third[SERVICE]).get("HIL_RELEASE") == "override", (
            "with BALENA_SUPERVISOR_OVERRIDE_LOCK=1 the new release did not run")
        assert not host_os.run(f"flock -n -x {lock} true").ok, (
            "the test's holder lost the lock: the override did not go through a held lock")
    finally:
        _release_the_apps_lock(host_os, lock)
        apps.deploy(target({"main": release_service(app_image)}))


def test_moving_to_another_app_purges_the_volumes(
        apps: Apps, app: dict[str, str], app_image: str) -> None:
    apps.write_marks(app[SERVICE], DATA, "first-app")
    other = target({"main": release_service(app_image)}, app_id="1002", name="hil-other")
    try:
        new = apps.deploy(other)
        got = apps.marks(new[SERVICE], DATA)
        assert got == dict.fromkeys(DATA), (
            f"another app's service sees the first app's data: {got}")
        # the supervisor names an app's volumes <appId>_<name> (its /data is <appId>_resin-data)
        volumes = apps.os.check("balena-engine volume ls -q", timeout=120).split()
        left = [v for v in volumes if v.startswith(f"{APP_ID}_")]
        assert not left, f"the first app's volumes are still there: {left} (all: {volumes})"
    finally:
        apps.deploy(target({"main": release_service(app_image)}))
