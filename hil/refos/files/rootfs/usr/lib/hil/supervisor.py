#!/usr/bin/python3
"""The reference OS's stand-in for the balena Supervisor: its device API on port 48484 and the
local-mode target state, run on balenaEngine through the engine's own API.

balenaOS runs the real supervisor (a Node.js program, in a container); this one runs on the host
OS and does only what the suites reach through the API a real device also has:

- ``GET /ping``, ``GET /v1/healthy`` (no key, as the real one), and with a key where one is
  needed: ``POST /v1/blink|reboot|shutdown|restart``, ``GET/POST /v2/local/target-state``,
  ``GET /v2/applications/state``, ``GET /v2/state/status``.
- Keys as the real supervisor decides for an unmanaged device (this one never talks to the
  cloud, so it is one whatever ``apiEndpoint`` says): needed only on a production device
  (``developmentMode`` not true); a wrong or missing key is a 401. Each service
  with the ``io.balena.features.supervisor-api`` label gets its own key in
  ``BALENA_SUPERVISOR_API_KEY``.
- Services run with what the target state grants (``privileged``, ``devices``, ``cap_add``,
  ``volumes``, ``environment``, ``labels``, ``network_mode``) and nothing more; named volumes
  are engine volumes ``<appId>_<name>`` (a single-container release's ``/data`` is its
  ``resin-data`` volume, as the release declares it).
- Containers are restarted by the engine after a boot (restart policy ``always``), never
  recreated; a changed service, ``/v1/restart`` or a new target state recreates them, an app
  that left the target state loses its containers and volumes. ``updates.lock`` in a service's
  ``/tmp/balena`` holds reboots and recreation back unless forced or
  ``SUPERVISOR_OVERRIDE_LOCK`` is set in the target state's config.
- Services with the supervisor-api label on the engine's bridge also join the ``supervisor0``
  network and reach the API at its gateway, 10.114.104.1, as the real supervisor's do.
- The extra firmware volume as the real one keeps it (its lib/extra-firmware.ts): before any
  other step of an apply, the engine volume ``extra-firmware`` exists and config.json's
  ``os.kernel.extraFirmwareVol`` names it (the OS's os-extra-firmware then points the kernel's
  firmware loader there); services labelled ``io.balena.features.extra-firmware`` get it at
  ``/extra-firmware``. config.json is not written while the device registers.
- The host's firewall as the real supervisor keeps it (its firewall.ts): the filter table's
  ``BALENA-FIREWALL`` chain, jumped to from ``INPUT``, in ``HOST_FIREWALL_MODE`` (the target
  state's config: ``on``, ``off`` (the default) or ``auto``), re-applied when the mode, local
  mode or the presence of host-networked services changes.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

PORT = 48484
VERSION = "0.0.0-hil"
ENGINE_SOCKET = "/var/run/balena-engine.sock"
CONFIG_JSON = "/mnt/boot/config.json"
STATE_DIR = "/mnt/data/resin-data/resin-supervisor"
STATE_FILE = f"{STATE_DIR}/target-state.json"
# /v1/blink, as the real one's (its lib/blink.ts, device-api/actions.ts): LED_FILE from
# supervisor.conf (/dev/null where it does not exist), toggled by the blinking module's default
# pattern (200 ms on, 200 ms off) for 15 s
LED_FILE = os.environ.get("LED_FILE") or "/sys/class/leds/led0/brightness"
IDENTIFY_SECONDS = 15.0
BLINK_SECONDS = 0.2
LOCK_DIR = "/tmp/balena-supervisor/services"
# the target state's config, dumped for the host OS (safe_reboot reads the override lock there)
CONFIG_DUMP = "/tmp/balena-supervisor/target-state-config"
SUPERVISED = "io.balena.supervised"
# the network of services that talk to the API (not in host networking), as the real one makes it
SUPERVISOR_NET = "supervisor0"
SUPERVISOR_SUBNET, SUPERVISOR_GATEWAY = "10.114.104.0/25", "10.114.104.1"
FIREWALL_CHAIN = "BALENA-FIREWALL"
FIREWALL_MODES = ("on", "off", "auto")
# where the API answers outside local mode (the real supervisor's constants.ts)
API_INTERFACES = ("resin-vpn", "tun0", "docker0", "lo", SUPERVISOR_NET)
TRUTHY = ("1", "true", "on")
# the engine volume the OS loads extra firmware from (the real one's lib/extra-firmware.ts), and
# where services labelled io.balena.features.extra-firmware see it
EXTRA_FIRMWARE_VOLUME, EXTRA_FIRMWARE_MOUNT = "extra-firmware", "/extra-firmware"


def log(message: str) -> None:
    print(f"[supervisor] {message}", file=sys.stderr, flush=True)


# --- the engine's API, over its unix socket ---------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(ENGINE_SOCKET)
        self.sock = sock


class EngineError(Exception):
    pass


def engine(method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
    raw = _engine_raw(method, path, body, timeout)
    return json.loads(raw) if raw and raw[:1] in (b"{", b"[") else raw.decode(errors="replace")


def pull(image: str) -> None:
    """``POST /images/create`` answers 200 and then streams JSON messages, one a line; a pull
    that fails says so in a message with ``error``."""
    path = "/images/create?fromImage=" + urllib.parse.quote(image, safe="")
    for line in _engine_raw("POST", path, None, 1800).splitlines():
        msg = json.loads(line) if line.strip() else {}
        if msg.get("error"):
            raise EngineError(f"pulling {image}: {msg['error']}")


def _engine_raw(method: str, path: str, body: Any, timeout: float) -> bytes:
    conn = _UnixConnection(timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as e:
        raise EngineError(f"{method} {path}: {e}") from e
    finally:
        conn.close()
    if resp.status >= 400:
        raise EngineError(f"{method} {path}: {resp.status} {raw.decode(errors='replace')[:300]}")
    return raw


def engine_alive() -> bool:
    try:
        return bool(engine("GET", "/_ping", timeout=10) == "OK")
    except EngineError:
        return False


def feature(svc: dict[str, Any], name: str) -> bool:
    """A service's ``io.balena.features.<name>`` label is truthy (as the real one's
    checkTruthy reads labels)."""
    return str(svc.get("labels", {}).get(f"io.balena.features.{name}")).lower() in TRUTHY


def wants_api(svc: dict[str, Any]) -> bool:
    return feature(svc, "supervisor-api")


def firewall_rules(mode: str, local: bool, host_bound: bool) -> str:
    """``iptables-restore --noflush`` input: BALENA-FIREWALL and INPUT's jump to it, rule for
    rule as the real supervisor's firewall.ts builds them (its two inserted rules first)."""
    def rule(spec: str, comment: str = "") -> str:
        return f"-A {FIREWALL_CHAIN} {spec}" + (f' -m comment --comment "{comment}"'
                                                if comment else "")
    api = [rule(f"-p tcp --dport {PORT}{'' if local else f' -i {i}'} -j ACCEPT", "Supervisor API")
           for i in ([""] if local else API_INTERFACES)]
    rules = [rule("-m state --state ESTABLISHED,RELATED -j ACCEPT"),
             rule("-m addrtype --src-type LOCAL -j ACCEPT", "Locally-sourced traffic"),
             *api, rule(f"-p tcp --dport {PORT} -j REJECT", "Supervisor API"),
             rule("-p tcp --dport 22222 -j ACCEPT", "SSH Server"),
             rule("-p tcp --dport 2375 -j ACCEPT", "balenaEngine"),
             rule("-m addrtype --dst-type MULTICAST -j ACCEPT", "mDNS"),
             rule("-p icmp -j ACCEPT", "ICMP"),
             rule("-p udp --dport 53 -i balena0 -j ACCEPT", "DNS")]
    if mode == "off" or (mode == "auto" and not host_bound):
        rules.append(rule("-j RETURN", f"Firewall disabled ({mode})"))
    rules.append(rule("-j REJECT", "Reject everything else"))
    return "\n".join(["*filter", f":{FIREWALL_CHAIN} - [0:0]", f"-F {FIREWALL_CHAIN}",
                      "-F INPUT", *rules, f"-A INPUT -j {FIREWALL_CHAIN}", "COMMIT", ""])


# --- device facts --------------------------------------------------------------------------------
def config() -> dict[str, Any]:
    try:
        with open(CONFIG_JSON) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_config_json(change: Callable[[dict[str, Any]], bool]) -> None:
    """config.json changed by ``change`` (which edits the parsed file and says whether it did),
    written as the OS's own tools write it: a sibling, synced, renamed over it, the directory
    synced (resin-boot is FAT: a power cut keeps one whole file). The file is read just before
    it is written: another writer's change made meanwhile is kept."""
    value = config()
    if not value or not change(value):
        return
    tmp = CONFIG_JSON + ".supervisor-new"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, CONFIG_JSON)
    fd = os.open(os.path.dirname(CONFIG_JSON), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def registering() -> bool:
    """The OS's registration rewrites config.json from what it read (its key, then
    registered_at): until it is done, a write of ours could be lost or lose its change."""
    c = config()
    return bool(c.get("apiEndpoint")) and "registered_at" not in c


def needs_key() -> bool:
    """The real supervisor asks for a key on an unmanaged production device, and on a managed
    one unless it is in local mode. This one never talks to the cloud, so it is always
    unmanaged: a key is needed exactly when developmentMode is not true."""
    return config().get("developmentMode") is not True


def local_mode() -> bool:
    """Local mode (target states from the API): a development device, as an unmanaged one."""
    return config().get("developmentMode") is True


def os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    with open("/etc/os-release") as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            out[k] = v.strip('"')
    return out


class Supervisor:
    def __init__(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        self.lock = threading.Lock()
        self.save_lock = threading.Lock()  # the API's thread and the apply loop both save
        self.wake = threading.Event()
        self.applying = False
        self.firmware_pending = False
        self.loop_beat = time.monotonic()
        self.keys: dict[str, str] = {}
        self.target: dict[str, Any] = {"local": {"name": "", "config": {}, "apps": {}},
                                       "dependent": {"apps": [], "devices": []}}
        try:
            with open(STATE_FILE) as f:
                saved = json.load(f)
            self.target, self.keys = saved["target"], saved["keys"]
        except (OSError, ValueError, KeyError):
            pass

    def save(self) -> None:
        tmp = STATE_FILE + ".new"
        with self.save_lock, open(tmp, "w") as f:
            json.dump({"target": self.target, "keys": self.keys}, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, STATE_FILE)
            directory = os.open(STATE_DIR, os.O_RDONLY)  # the rename too, before it answers
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    # --- keys ------------------------------------------------------------------------------
    def key_for(self, app_id: str, service: str) -> str:
        name = f"{app_id}/{service}"
        if name not in self.keys:
            self.keys[name] = os.urandom(16).hex()
            self.save()
        return self.keys[name]

    def key_valid(self, key: str) -> bool:
        return bool(key) and key in self.keys.values()

    # --- the target state --------------------------------------------------------------------
    def apps(self) -> dict[str, Any]:
        apps = self.target.get("local", {}).get("apps", {})
        return apps if isinstance(apps, dict) else {}

    def set_target(self, target: dict[str, Any]) -> None:
        local = target.get("local")
        if not isinstance(local, dict) or not isinstance(local.get("apps", {}), dict):
            raise ValueError("target state needs local.apps as an object")
        for app_id, app in local.get("apps", {}).items():
            if not str(app_id).isdigit() or not isinstance(app.get("services", {}), dict):
                raise ValueError(f"app {app_id!r}: needs a numeric id and services as an object")
            for sid, svc in app.get("services", {}).items():
                if not isinstance(svc, dict) or not svc.get("image"):
                    raise ValueError(f"app {app_id} service {sid}: needs an image")
        with self.lock:
            self.target = target
            self.save()
            self.dump_config()
        self.wake.set()

    def dump_config(self) -> None:
        os.makedirs(os.path.dirname(CONFIG_DUMP), exist_ok=True)
        with open(CONFIG_DUMP + ".new", "w") as f:
            json.dump(self.target.get("local", {}).get("config", {}), f)
        os.replace(CONFIG_DUMP + ".new", CONFIG_DUMP)

    def config_var(self, name: str, default: str) -> str:
        """A variable of the target state's config, read without its namespace as the real
        supervisor reads them: ``BALENA_<name>`` (as balenaCloud names it), ``RESIN_...`` or
        bare."""
        cfg = self.target.get("local", {}).get("config", {})
        bare = {k.removeprefix("BALENA_").removeprefix("RESIN_"): v for k, v in cfg.items()}
        return str(bare.get(name, default))

    def override_lock(self) -> bool:
        return self.config_var("SUPERVISOR_OVERRIDE_LOCK", "0") in ("1", "true")

    def firewall_mode(self) -> str:
        mode = self.config_var("HOST_FIREWALL_MODE", "off")
        return mode if mode in FIREWALL_MODES else "off"  # an invalid one: off, as the real one

    def host_bound(self) -> bool:
        return any(svc.get("network_mode") == "host" for app in self.apps().values()
                   for svc in app.get("services", {}).values())

    def keep_firewall(self) -> None:
        """Apply the firewall at start and again whenever what it depends on changes."""
        applied: tuple[str, bool, bool] | None = None
        while True:
            want = (self.firewall_mode(), local_mode(), self.host_bound())
            if want != applied:
                try:
                    proc = subprocess.run(["iptables-restore", "-w", "10", "--noflush"],
                                          input=firewall_rules(*want), text=True,
                                          capture_output=True, check=False, timeout=60)
                    error = proc.stderr.strip() if proc.returncode else ""
                except (OSError, subprocess.TimeoutExpired) as e:
                    error = str(e)
                if error:  # tried again at the next look
                    log(f"Firewall mode not applied: {error}")
                else:
                    applied = want
                    log(f"Firewall mode applied: {want[0]}")
            time.sleep(2)  # config.json has no change event to wait for here

    # --- containers ----------------------------------------------------------------------------
    def containers(self) -> list[dict[str, Any]]:
        got = engine("GET", "/containers/json?all=1&filters="
                     + urllib.parse.quote(json.dumps({"label": [SUPERVISED]})))
        return got if isinstance(got, list) else []

    def wanted(self) -> dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]]:
        """Container name -> (appId, service name, service, container spec) for every target
        service. The name ends in a digest of the spec: a changed service gets a new name, so
        it is recreated."""
        out = {}
        for app_id, app in self.apps().items():
            services = app.get("services", {})
            for sid, svc in services.items():
                name = svc.get("serviceName") or f"service{sid}"
                spec = self.container_spec(str(app_id), name, sid, svc, app)
                digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
                out[f"{name}_{svc.get('imageId', sid)}_{app.get('releaseId', 0)}_"
                    f"{app.get('commit', 'local')}_{digest[:8]}"] = (str(app_id), name, svc, spec)
        return out

    def container_spec(self, app_id: str, name: str, sid: str, svc: dict[str, Any],
                       app: dict[str, Any]) -> dict[str, Any]:
        c = config()
        rel = os_release()
        sup_api = wants_api(svc)
        network = svc.get("network_mode") or "bridge"
        host = "127.0.0.1" if network == "host" else SUPERVISOR_GATEWAY
        env = {
            "DEVICE_UUID": str(c.get("uuid", "")), "DEVICE_TYPE": rel.get("SLUG", ""),
            # stable (a runtime hostname change would recreate every container)
            "DEVICE_NAME_AT_INIT": str(c.get("deviceName") or str(c.get("uuid", ""))[:7]),
            "DEVICE_ARCH": os.uname().machine, "APP_ID": app_id,
            "APP_NAME": str(app.get("name", "")), "SERVICE_NAME": name,
            "HOST_OS_VERSION": f"balenaOS {rel.get('VERSION', '')}",
            "SUPERVISOR_VERSION": VERSION, "APP_LOCK_PATH": "/tmp/balena/updates.lock",
        }
        if sup_api:
            env.update({"SUPERVISOR_ADDRESS": f"http://{host}:{PORT}", "SUPERVISOR_HOST": host,
                        "SUPERVISOR_PORT": str(PORT),
                        "SUPERVISOR_API_KEY": self.key_for(app_id, name)})
        environment = [f"{p}_{k}={v}" for k, v in env.items() for p in ("BALENA", "RESIN")]
        environment += ["BALENA=1", "RESIN=1",
                        "BALENA_SERVICE_HANDOVER_COMPLETE_PATH=/tmp/balena/handover-complete",
                        "RESIN_SERVICE_HANDOVER_COMPLETE_PATH=/tmp/resin/handover-complete"]
        environment += [f"{k}={v}" for k, v in sorted(svc.get("environment", {}).items())]
        lock_dir = f"{LOCK_DIR}/{app_id}/{name}"
        binds = [f"{lock_dir}:/tmp/balena", f"{lock_dir}:/tmp/resin"]
        for v in svc.get("volumes", []):
            src, _, dst = v.partition(":")
            binds.append(v if src.startswith("/") else f"{app_id}_{src}:{dst}")
        if feature(svc, "extra-firmware"):
            binds.append(f"{EXTRA_FIRMWARE_VOLUME}:{EXTRA_FIRMWARE_MOUNT}")
        devices = []
        for d in svc.get("devices", []):
            host_path, _, rest = d.partition(":")
            inner, _, perms = rest.partition(":")
            devices.append({"PathOnHost": host_path, "PathInContainer": inner or host_path,
                            "CgroupPermissions": perms or "rwm"})
        labels = {**svc.get("labels", {}), SUPERVISED: "true", "io.balena.app-id": app_id,
                  "io.balena.service-name": name, "io.balena.service-id": str(sid)}
        spec: dict[str, Any] = {
            "Image": svc["image"], "Env": environment, "Labels": labels,
            "HostConfig": {
                "Binds": binds, "Devices": devices, "CapAdd": svc.get("cap_add", []),
                "Privileged": bool(svc.get("privileged", False)), "NetworkMode": network,
                "RestartPolicy": {"Name": svc.get("restart", "always")},
            },
        }
        if svc.get("command"):
            cmd = svc["command"]
            spec["Cmd"] = cmd if isinstance(cmd, list) else ["/bin/sh", "-c", cmd]
        return spec

    def ensure_supervisor_network(self) -> None:
        try:
            engine("GET", f"/networks/{SUPERVISOR_NET}")
        except EngineError:
            engine("POST", "/networks/create", {
                "Name": SUPERVISOR_NET, "Driver": "bridge", "CheckDuplicate": True,
                "IPAM": {"Config": [{"Subnet": SUPERVISOR_SUBNET,
                                     "Gateway": SUPERVISOR_GATEWAY}]},
                "Options": {"com.docker.network.bridge.name": SUPERVISOR_NET}})

    def locked(self, app_id: str = "") -> list[str]:
        """The update locks services of ``app_id`` (every app: "") hold."""
        held = []
        for root, _dirs, files in os.walk(os.path.join(LOCK_DIR, app_id)):
            held += [os.path.join(root, f) for f in files if f == "updates.lock"]
        return held

    # --- reconciling ---------------------------------------------------------------------------
    def apply(self) -> bool:
        """One pass towards the target state; False while a lock holds a change back."""
        self.firmware_pending = not self.ensure_extra_firmware()
        wanted = self.wanted()
        for app_id, svc_name, _svc, _spec in wanted.values():
            # on tmpfs: gone after a boot, and the engine cannot start a container without them
            os.makedirs(f"{LOCK_DIR}/{app_id}/{svc_name}", exist_ok=True)
        done = True
        for c in self.containers():
            name, app_id = c["Names"][0].lstrip("/"), c["Labels"].get("io.balena.app-id", "")
            if name in wanted:
                continue
            if self.locked(app_id) and not self.override_lock():
                log(f"Updates are locked: {', '.join(self.locked(app_id))}")
                done = False
                continue
            log(f"removing {name}")
            engine("DELETE", f"/containers/{c['Id']}?force=1")
        current = {c["Names"][0].lstrip("/"): c for c in self.containers()}
        for name, (app_id, svc_name, svc, spec) in wanted.items():
            if name in current:
                if current[name]["State"] != "running":
                    log(f"starting {name}")
                    engine("POST", f"/containers/{current[name]['Id']}/start")
                continue
            if any(c["Labels"].get("io.balena.app-id") == app_id
                   and c["Labels"].get("io.balena.service-name") == svc_name
                   for c in current.values()):
                continue  # its old container is kept by a lock
            self.ensure_image(svc["image"])
            for v in svc.get("volumes", []):
                src = v.partition(":")[0]
                if not src.startswith("/"):
                    self.ensure_volume(app_id, src)
            log(f"creating {name}")
            engine("POST", "/containers/create?name=" + urllib.parse.quote(name), spec)
            if wants_api(svc) and spec["HostConfig"]["NetworkMode"] != "host":
                self.ensure_supervisor_network()
                engine("POST", f"/networks/{SUPERVISOR_NET}/connect", {"Container": name})
            engine("POST", f"/containers/{urllib.parse.quote(name)}/start")
        self.purge_left_apps()
        return done

    def ensure_extra_firmware(self) -> bool:
        """As the real one before any other step: the extra firmware volume exists and
        config.json's os.kernel.extraFirmwareVol names it (the OS then points the kernel's
        firmware loader at it). The volume stays empty until a labelled service fills it.
        False while that waits for the device's registration to finish."""
        def named(c: dict[str, Any]) -> bool:
            os_conf = c.get("os")
            return (isinstance(os_conf, dict) and isinstance(os_conf.get("kernel"), dict)
                    and os_conf["kernel"].get("extraFirmwareVol") == EXTRA_FIRMWARE_VOLUME)

        try:
            engine("GET", f"/volumes/{EXTRA_FIRMWARE_VOLUME}")
            exists = True
        except EngineError:
            exists = False
        if exists and named(config()):
            return True
        if registering():
            return False
        log("Configuring extra firmware volume")
        engine("POST", "/volumes/create", {"Name": EXTRA_FIRMWARE_VOLUME})

        def name_it(c: dict[str, Any]) -> bool:
            if named(c):
                return False
            os_conf = c.setdefault("os", {})
            if not isinstance(os_conf, dict) or not isinstance(os_conf.setdefault("kernel", {}),
                                                               dict):
                log("Malformed config.json: os or os.kernel is not an object")
                return False
            was = os_conf["kernel"].get("extraFirmwareVol")
            if was is not None:
                log(f"Extra firmware volume name changed from {was} to {EXTRA_FIRMWARE_VOLUME}")
            os_conf["kernel"]["extraFirmwareVol"] = EXTRA_FIRMWARE_VOLUME
            return True

        update_config_json(name_it)
        return True

    def ensure_image(self, image: str) -> None:
        try:
            engine("GET", f"/images/{urllib.parse.quote(image, safe='')}/json")
        except EngineError:
            log(f"pulling {image}")
            pull(image)

    def ensure_volume(self, app_id: str, name: str) -> None:
        engine("POST", "/volumes/create", {
            "Name": f"{app_id}_{name}",
            "Labels": {SUPERVISED: "true", "io.balena.app-id": app_id}})

    def purge_left_apps(self) -> None:
        """Volumes (and lock directories) of apps no longer in the target state: moving a
        device to another app purges them."""
        keep = set(self.apps())
        vols = engine("GET", "/volumes?filters="
                      + urllib.parse.quote(json.dumps({"label": [SUPERVISED]})))
        for v in (vols or {}).get("Volumes") or []:
            if v["Labels"].get("io.balena.app-id") not in keep:
                log(f"purging volume {v['Name']}")
                engine("DELETE", f"/volumes/{urllib.parse.quote(v['Name'])}")
        for entry in os.listdir(LOCK_DIR) if os.path.isdir(LOCK_DIR) else []:
            if entry not in keep:
                shutil.rmtree(f"{LOCK_DIR}/{entry}", ignore_errors=True)

    def run(self) -> None:
        """Apply the target state at start, on every change, and every 5 minutes; every 5 s
        while a lock or the engine holds it back. An exception other than the engine's ends the
        loop, and /v1/healthy then says so."""
        while True:
            self.loop_beat = time.monotonic()
            done = False
            if engine_alive():
                self.applying = True
                try:
                    done = self.apply()
                except EngineError as e:
                    log(f"apply failed: {e}")
                self.applying = not done
            self.wake.wait(300 if done and not self.firmware_pending else 5)
            self.wake.clear()

    def restart_app(self, app_id: str, force: bool) -> None:
        if self.locked(app_id) and not (force or self.override_lock()):
            raise PermissionError(f"Updates are locked: {', '.join(self.locked(app_id))}")
        for c in self.containers():
            if c["Labels"].get("io.balena.app-id") == app_id:
                engine("DELETE", f"/containers/{c['Id']}?force=1")
        self.wake.set()

    # --- reports -------------------------------------------------------------------------------
    def app_states(self) -> dict[str, Any]:
        """Each target service's state, from the container made for the target as it is now
        (an older one still being replaced does not count)."""
        by_name = {c["Names"][0].lstrip("/"): c for c in self.containers()}
        wanted = {(app_id, svc_name): by_name.get(name)
                  for name, (app_id, svc_name, _svc, _spec) in self.wanted().items()}
        out: dict[str, Any] = {}
        for app_id, app in self.apps().items():
            services = {}
            for svc in app.get("services", {}).values():
                name = svc.get("serviceName")
                c = wanted.get((app_id, name))
                status = "Installing" if c is None else (
                    "Running" if c["State"] == "running" else c["State"].capitalize())
                services[name] = {"status": status, "releaseId": app.get("releaseId"),
                                  "downloadProgress": None,
                                  "containerId": c["Id"] if c else None}
            out[app.get("name") or app_id] = {"appId": int(app_id), "commit": app.get("commit"),
                                              "services": services}
        return out


class Blink:
    """The identification blink: a thread toggles the LED until ``until``; a new request while
    it runs extends it, as the real one restarts its pattern."""

    def __init__(self, path: str) -> None:
        self.path = path if os.path.exists(path) else "/dev/null"
        self.lock = threading.Lock()
        self.until = 0.0
        self.running = False

    def identify(self, seconds: float = IDENTIFY_SECONDS) -> None:
        with self.lock:
            self.until = time.monotonic() + seconds
            if not self.running:
                self.running = True
                threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        on = True
        while True:
            with self.lock:
                if time.monotonic() >= self.until:
                    self.running = False
                    break
            self._write("1" if on else "0")
            on = not on
            time.sleep(BLINK_SECONDS)
        self._write("0")

    def _write(self, value: str) -> None:
        try:
            with open(self.path, "w") as f:
                f.write(value)
        except OSError as e:
            log(f"blink: cannot write {self.path}: {e}")


SUP: Supervisor  # made by main(): nothing touches the disk at import (tests load this file)
BLINK: Blink


class Api(http.server.BaseHTTPRequestHandler):
    server_version = "balena-supervisor-hil"

    def log_message(self, format: str, *args: Any) -> None:
        log(f"api: {self.command} {self.path.split('?')[0]} {args[1] if len(args) > 1 else ''}")

    def reply(self, status: int, body: Any) -> None:
        raw = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type",
                         "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        if not n:
            return {}
        raw = self.rfile.read(n)
        if "json" in (self.headers.get("Content-Type") or ""):
            value = json.loads(raw)
            return value if isinstance(value, dict) else {}
        return {k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode()).items()}

    def authorised(self, query: dict[str, list[str]]) -> bool:
        if not needs_key():
            return True
        key = (query.get("apikey") or [""])[-1]
        auth = self.headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        if not key and scheme.lower() in ("bearer", "apikey"):
            key = value.strip()
        return SUP.key_valid(key)

    def do_GET(self) -> None:
        self.handle_request("GET")

    def do_POST(self) -> None:
        self.handle_request("POST")

    def handle_request(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path.rstrip("/") or "/", urllib.parse.parse_qs(url.query)
        try:
            if (method, path) == ("GET", "/v1/healthy"):
                alive = engine_alive() and time.monotonic() - SUP.loop_beat < 600
                return self.reply(200, "OK") if alive else self.reply(500, "Unhealthy")
            if (method, path) == ("GET", "/ping"):
                return self.reply(200, "OK")
            if not self.authorised(query):
                return self.reply(401, "Unauthorized")
            self.route(method, path)
        except ValueError as e:
            self.reply(400, {"status": "failed", "message": str(e)})
        except PermissionError as e:
            self.reply(423, {"Data": "", "Error": str(e)})
        except EngineError as e:
            self.reply(503, {"status": "failed", "message": str(e)})

    def route(self, method: str, path: str) -> None:
        if (method, path) == ("POST", "/v1/blink"):
            BLINK.identify()
            self.reply(200, "OK")
        elif (method, path) in (("POST", "/v1/reboot"), ("POST", "/v1/shutdown")):
            force = str(self.body().get("force", "")).lower() in ("1", "true")
            held = SUP.locked()
            if held and not (force or SUP.override_lock()):
                raise PermissionError(f"Updates are locked: {', '.join(held)}")
            self.reply(202, {"Data": "OK", "Error": None})
            action = "reboot" if path.endswith("reboot") else "poweroff"
            log(f"{action} requested through the API")
            threading.Timer(1.0, subprocess.call, ([action],)).start()
        elif (method, path) == ("POST", "/v1/restart"):
            body = self.body()
            app_id = str(body.get("appId", ""))
            if app_id not in SUP.apps():
                raise ValueError(f"no app {app_id!r} in the target state")
            SUP.restart_app(app_id, str(body.get("force", "")).lower() in ("1", "true"))
            self.reply(200, "OK")
        elif (method, path) == ("GET", "/v2/local/target-state"):
            self.reply(200, {"status": "success", "state": SUP.target})
        elif (method, path) == ("POST", "/v2/local/target-state"):
            if not local_mode():
                raise ValueError("Target state can only be set when device is in local mode")
            SUP.set_target(self.body())
            self.reply(200, {"status": "success", "message": "OK"})
        elif (method, path) == ("GET", "/v2/applications/state"):
            self.reply(200, SUP.app_states())
        elif (method, path) == ("GET", "/v2/state/status"):
            containers = [
                {"status": s["status"], "serviceName": name, "appId": a["appId"],
                 "containerId": s["containerId"], "releaseId": s["releaseId"]}
                for a in SUP.app_states().values() for name, s in a["services"].items()]
            self.reply(200, {"status": "success",
                             "appState": "applying" if SUP.applying else "applied",
                             "overallDownloadProgress": None, "containers": containers,
                             "images": [], "release": None})
        else:
            self.reply(404, "Not Found")


def main() -> None:
    global SUP, BLINK
    SUP = Supervisor()
    BLINK = Blink(LED_FILE)
    SUP.dump_config()
    threading.Thread(target=SUP.run, daemon=True).start()
    threading.Thread(target=SUP.keep_firewall, daemon=True).start()
    server = http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Api)
    log(f"Supervisor API successfully started on port {PORT}")
    server.serve_forever()


if __name__ == "__main__":
    main()
