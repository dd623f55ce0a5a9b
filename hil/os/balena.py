"""The host-OS adapter the suites use as ``dut.os``, in balenaOS's own words.

One implementation for balenaOS and for the project's reference OS, which honours the same
contract (partition labels, ``/mnt/boot/config.json``, the bootloader files, the rollback
breadcrumbs in ``/mnt/state``). Where the two differ it is hidden here and said so:

- ``hostapp_update``: balenaOS installs a hostapp (a container image: a bundle file or an image
  reference); the reference OS installs an ext4 root filesystem image, from a URL it downloads.
- The reference OS's bootloaders print their decision on the console each boot
  (``HIL-BOOT: ...``); balenaOS's do not, so a ``BootRecord`` holds only what the rig sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hil import redact
from hil.console.log import Hit
from hil.console.shell import CommandFailed, ConsoleGarbled, Result
from hil.errors import InfraError, OSContractError
from hil.os import hostdisk, parse
from hil.os.contract import (
    BootRecord,
    RootPart,
    Roots,
    RunningUpdate,
    UpdateBreak,
    UpdateResult,
    check,
)
from hil.os.parse import BootLine, BootState, Mount
from hil.os.secret import Secret
from hil.os.supervisor import SupervisorAPI, http_request
from hil.os.updates import UpdateImage

if TYPE_CHECKING:
    from hil.dut import Dut
    from hil.os.transfer import FileServer
    from hil.refos.appimage import AppImage

log = logging.getLogger(__name__)

BOOT_MNT = "/mnt/boot"
STATE_MNT = "/mnt/state"
DATA_MNT = "/mnt/data"
CONFIG_JSON = f"{BOOT_MNT}/config.json"
APP_DATA = f"{DATA_MNT}/resin-data"  # what containers see as /data
SECRET_KEYS = redact.SECRET_KEYS
MARKERS = ("rollback-health-breadcrumb", "rollback-altboot-breadcrumb",
           "rollback-health-triggered", "rollback-altboot-triggered", "rollback-health-failed")
BREADCRUMBS = frozenset(MARKERS[:2])
HEALTH_VARIABLES = f"{STATE_MNT}/rollback-health-variables"
INACTIVE = "/mnt/sysroot/inactive"  # the other root, where an update is installed
# (how, is the reference OS) -> the shell word naming what to break in the new root, as
# balenaOS's tests name it: balenaOS boots its hostapp's /current/boot/init, the reference OS
# /sbin/init; on both the health check needs the engine's CLI (find: both layouts).
UPDATE_BREAKS: dict[str, dict[bool, str]] = {
    "init": {False: f"{INACTIVE}/current/boot/init", True: f"{INACTIVE}/sbin/init"},
    "health": {False: f'$(find {INACTIVE}/ | grep "usr/bin/balena-engine$")',
               True: f'$(find {INACTIVE}/ | grep "usr/bin/balena-engine$")'},
    "vpn": {False: f'$(find {INACTIVE}/ | grep "bin/openvpn$")',
            True: f'$(find {INACTIVE}/ | grep "bin/openvpn$")'},
}
VPN_ONLINE = "/run/openvpn/vpn_status/active"  # openvpn's up script's marker
VPN_CONFIG = "/etc/openvpn/openvpn.conf"  # os-config writes it from the API
ROOT_LABELS = ("resin-rootA", "resin-rootB")
ENGINE = "balena-engine"  # balenaEngine's CLI on balenaOS (`balena` links to it)
ENGINE_UNIT = "balena.service"  # its systemd unit (alias balena-engine.service)
ENGINE_TCP_PORT = 2375  # the engine's API without TLS, in development mode only
# the engine's containerd, by process name: balenaEngine's multi-call binary on balenaOS,
# Debian's moby (the reference OS) runs containerd itself
ENGINE_CONTAINERD = {False: "balena-engine-containerd", True: "containerd"}
# the system log: journald's, or on an OS without it a syslog file or ring buffer
SYSTEM_LOG = ("if command -v journalctl >/dev/null; then journalctl --no-pager -q -o short "
              "-n 5000; elif [ -f /var/log/messages ]; then cat /var/log/messages; "
              "else logread; fi")
BOOTLIMIT = 3  # both bootloaders boot the other root once bootcount exceeds this
# Printed once per boot by the bootloader (the kernel's banners would count a boot twice).
BOOTLOADER_BANNER = {"uboot": re.compile(rb"U-Boot 20\d\d"),
                     "grub": re.compile(rb"SeaBIOS \(version|GNU GRUB|Welcome to GRUB")}


@dataclass
class _Learned:
    """What an adapter and its ``via_ssh()`` twin learn of the device once and share."""

    reference: bool | None = None  # the reference OS (its bootloaders print HIL-BOOT lines)
    data_dir: str | None = None
    file_server: FileServer | None = None
    last_update_seconds: float | None = None
    # app image reference -> (the boot, by Dut.boots, and the image ID) the engine held it at
    images: dict[str, tuple[int, str]] = field(default_factory=dict)


# balenaOS applies config.json with config-json.service, started by a path unit on each write:
# a write while it runs, or quick successive writes, hit systemd's start rate limit ("start
# request repeated too quickly") and are not applied. As balenaOS's own tests do around each
# write: wait until the unit is idle (30 s at most), then reset its failures.
CONFIG_JSON_SETTLE = (
    "i=0; while case $(systemctl is-active config-json.service) in active|activating) true;; "
    "*) false;; esac && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done; "
    "systemctl reset-failed config-json.service 2>/dev/null; true")


REGISTER_WAIT = 120  # seconds an edit of config.json waits for the device's registration


def registration_wait(path: str, seconds: int) -> str:
    """Shell that waits while the device registers, then fails saying so if it still does.
    A device provisioning itself rewrites config.json (its deviceApiKey, then registered_at, as
    balena's supervisor does) from what it read before: an edit made in between is lost. So an
    edit waits while the device is managed (an apiEndpoint) and has no registered_at yet."""
    registering = (f"grep -q '\"apiEndpoint\" *: *\"[^\"]' {path} && "
                   f"! grep -q '\"registered_at\"' {path}")
    return (f"i=0; while {registering} && [ $i -lt {seconds * 2} ]; do sleep 0.5; "
            f"i=$((i+1)); done; if {registering}; then echo 'config.json not edited: expected "
            f"the device to finish registering (registered_at) within {seconds} s, its "
            "registration rewrites the file; seen an apiEndpoint and no registered_at'; false; fi")


EDIT_ROUNDS = 3  # an edit that another writer overwrote is made again, this many times in all


def config_json_edit(path: str, jq_args: str, jq_filter: str,
                     settle: str = CONFIG_JSON_SETTLE) -> str:
    """Shell that edits the JSON file ``path`` with jq, as balenaOS's own tools write it (a
    sibling, synced, renamed over it, the directory synced), once the OS is done applying it
    (``settle``), and waits for the OS to apply the edit. Other programs write config.json too
    (the supervisor, the OS's registration), each from what it read before: when the file no
    longer holds what this edit wrote once the OS applied it, another write came in between,
    and the edit is made again on what is there now."""
    tmp = shlex.quote(f"{path}.hil-new")
    wrote = shlex.quote(f"{path}.hil-wrote")
    target, folder = shlex.quote(path), shlex.quote(posixpath.dirname(path) or ".")
    return (f"n=0; ok=1; while :; do {settle}; "
            f"jq {jq_args} {shlex.quote(jq_filter)} {target} > {tmp} && [ -s {tmp} ] && "
            f"cp {tmp} {wrote} && sync {tmp} && mv -f {tmp} {target} && sync {folder} || "
            f"{{ ok=0; rm -f {tmp} {wrote}; break; }}; {settle}; n=$((n+1)); "
            f"if cmp -s {wrote} {target} || [ $n -ge {EDIT_ROUNDS} ]; then rm -f {wrote}; "
            "break; fi; echo 'config.json: another write came in between: edited again'; done; "
            '[ "$ok" = 1 ]')


class BalenaOS:
    """``dut.os``. Commands go over the console by default (works with no network); reads of
    ``config.json`` and updates go over SSH when the rig has a network (keys never pass the
    console; bulk data is fast). ``via_ssh()`` is the same adapter over SSH only, for a
    production device whose console has no shell."""

    def __init__(self, dut: Dut, *, _via: str = "console",
                 _learned: _Learned | None = None) -> None:
        """Whether the device runs the reference OS is told by ``flashed`` where the session
        knows it before the first boot (it built the image); else learnt from os-release."""
        self.dut = dut
        self.bootloader = dut.rig.config.device_type.bootloader
        self.via = _via
        self._learned = _learned or _Learned()

    def via_ssh(self) -> BalenaOS:
        return BalenaOS(self.dut, _via="ssh", _learned=self._learned)

    def close(self) -> None:
        server, self._learned.file_server = self._learned.file_server, None
        if server is not None:
            server.close()

    # --- running commands -----------------------------------------------------------------
    def run(self, command: str, timeout: float | None = None, *,
            read_only: bool = False) -> Result:
        """Run on the device over this adapter's transport; output merged. ``read_only``
        commands are re-run once if an OS message cut into their console reply."""
        timeout = timeout or self.dut.timeouts.command
        if self.via == "ssh":
            return self.dut.ssh.run(command, timeout)
        for attempt in (1, 2):
            try:
                return self.dut.run(command, timeout)
            except ConsoleGarbled as exc:
                # A noisy line, or the OS printing to /dev/console while a reply streams (the
                # health check announcing a commit: the shell drops such lines, but one made
                # only of base64 characters garbles the reply). A command that did not run, or
                # a read-only one, may run again.
                if attempt == 2 or (exc.ran and not read_only):
                    raise
                log.warning("console garbled %r (%s); running it again", command,
                            "it ran" if exc.ran else "it did not run")
        raise AssertionError("unreachable")

    def check(self, command: str, timeout: float | None = None, *,
              read_only: bool = False) -> str:
        result = self.run(command, timeout, read_only=read_only)
        if not result.ok:
            raise CommandFailed(result)
        return result.stdout

    def _private(self, command: str, timeout: float | None = None) -> Result | None:
        """Run where the output stays off the console log (SSH), or None if the rig has no
        network to do so."""
        if not self.dut.ssh.available:
            return None
        return self.dut.ssh.run(command, timeout or self.dut.timeouts.command)

    # --- identity and release ---------------------------------------------------------------
    def os_release(self, root: str = "/") -> dict[str, str]:
        path = f"{root.rstrip('/')}/etc/os-release"
        return parse.os_release(self.check(f"cat {shlex.quote(path)}", read_only=True))

    def version(self, root: str = "/") -> str:
        """VERSION of the OS in ``root`` (``/mnt/sysroot/inactive`` for the other root)."""
        release = self.os_release(root)
        version = release.get("VERSION") or release.get("VERSION_ID")
        if not version:
            raise OSContractError(f"{root}/etc/os-release has no VERSION: {release}")
        return version

    @property
    def is_reference_os(self) -> bool:
        """The one answer to "is this the reference OS?" (``VARIANT_ID=hil-refos``)."""
        if self._learned.reference is None:
            self._learned.reference = self.os_release().get("VARIANT_ID") == "hil-refos"
        return self._learned.reference

    def learn(self) -> None:
        _ = self.is_reference_os

    def flashed(self, reference: bool | None) -> None:
        learned = self._learned
        learned.reference, learned.data_dir, learned.last_update_seconds = reference, None, None
        learned.images.clear()

    def hostname(self) -> tuple[str, str]:
        """(/etc/hostname, what ``hostname`` says)."""
        out = self.check("cat /etc/hostname; echo; hostname", read_only=True).split()
        return (out[0] if out else "", out[-1] if len(out) > 1 else "")

    # --- partitions -------------------------------------------------------------------------
    def mounts(self) -> list[Mount]:
        return parse.findmnt(self.check("findmnt -rn -o SOURCE,TARGET,FSTYPE,OPTIONS",
                                       read_only=True))

    def labels(self) -> dict[str, str]:
        """Partition label -> device (from /dev/disk/by-label)."""
        out = self.check('for l in /dev/disk/by-label/*; do [ -e "$l" ] && '
                         'printf "%s %s\\n" "${l##*/}" "$(readlink -f "$l")"; done; true',
                         read_only=True)
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def roots(self) -> Roots:
        """The active and inactive root partitions (by-state links, labels, the mount)."""
        out = self.check(
            'for s in active inactive; do printf "%s %s\\n" "$s" '
            '"$(readlink -f /dev/disk/by-state/$s 2>/dev/null)"; done; '
            'for l in /dev/disk/by-label/*; do printf "label %s %s\\n" "${l##*/}" '
            '"$(readlink -f "$l")"; done; '
            'printf "mounted %s\\n" "$(findmnt -no SOURCE /mnt/sysroot/active)"',
            read_only=True)
        state: dict[str, str] = {}
        label_of: dict[str, str] = {}
        mounted = ""
        for line in out.splitlines():
            f = line.split()
            if len(f) == 2 and f[0] in ("active", "inactive"):
                state[f[0]] = f[1]
            elif len(f) == 3 and f[0] == "label":
                label_of[f[2]] = f[1]
            elif f and f[0] == "mounted":
                mounted = f[1] if len(f) > 1 else ""
        devices = {label: dev for dev, label in label_of.items()}
        if not state.get("active"):
            # no by-state links: the root mounted at /mnt/sysroot/active is the active one
            if not mounted:
                raise OSContractError("neither /dev/disk/by-state/active nor a mount at "
                                      f"/mnt/sysroot/active: {out!r}")
            state["active"] = mounted
        if not state.get("inactive"):
            others = [devices[x] for x in ROOT_LABELS if devices.get(x) not in
                      (None, state["active"])]
            if not others:
                raise OSContractError(f"cannot tell the inactive root: {out!r}")
            state["inactive"] = others[0]

        def part(dev: str) -> RootPart:
            number = parse.partition_number(dev)
            if number is None:
                raise OSContractError(f"{dev} is not a partition")
            return RootPart(label_of.get(dev, "?"), dev, number)

        return Roots(part(state["active"]), part(state["inactive"]), mounted)

    @property
    def data_dir(self) -> str:
        """Where apps' persistent data lives: ``/data`` where the host OS shows it there (the
        reference OS bind-mounts it), else its backing directory on resin-data."""
        if self._learned.data_dir is None:
            at = parse.mount_at(self.mounts(), "/data")
            self._learned.data_dir = "/data" if at is not None else APP_DATA
        return self._learned.data_dir

    # --- config.json --------------------------------------------------------------------------
    def config_json(self) -> dict[str, Any]:
        """``config.json`` as the device has it. Secret keys come back as :class:`Secret`
        (compare with ``.matches``; repr shows only a fingerprint). Read over SSH where the rig
        has a network, so no key passes the console; else the device hashes them first."""
        private = self._private(f"cat {CONFIG_JSON}")
        if private is not None:
            if not private.ok:
                raise CommandFailed(private)
            try:
                cfg: dict[str, Any] = json.loads(private.stdout)
            except ValueError as exc:
                raise OSContractError(f"{CONFIG_JSON} is not valid JSON ({exc})") from None
            for key in SECRET_KEYS:
                if isinstance(cfg.get(key), str):
                    cfg[key] = Secret(cfg[key])
            return cfg
        # console: secrets are replaced by their SHA-256 on the device
        deletes = ", ".join(f".{k}" for k in SECRET_KEYS)
        picks = ", ".join(f'(.{k} // "")' for k in SECRET_KEYS)
        out = self.check(
            f"jq -r '(del({deletes}) | tojson), {picks}' {CONFIG_JSON} | "
            '{ read -r j; echo "$j"; while IFS= read -r v; do '
            'if [ -n "$v" ]; then printf %s "$v" | sha256sum | cut -d" " -f1; '
            "else echo -; fi; done; }", read_only=True)
        lines = out.splitlines()
        try:
            cfg = json.loads(lines[0])
        except (ValueError, IndexError):
            raise OSContractError(f"{CONFIG_JSON} is not valid JSON") from None
        for key, digest in zip(SECRET_KEYS, lines[1:], strict=False):
            if digest and digest != "-":
                cfg[key] = Secret(digest=digest)
        return cfg

    def set_config(self, **changes: Any) -> None:
        """Change keys of ``config.json`` on the device atomically (write a sibling, sync,
        rename), as balenaOS's own tools do; the OS re-applies it. A key may be a dotted path
        (``**{"os.sshKeys": [...]}``); ``None`` deletes it. Secrets cannot be set this way:
        the command would show them on the console."""
        if not changes:
            return
        filters: list[str] = []
        args: list[str] = []
        for i, (key, value) in enumerate(changes.items()):
            path = key.split(".")
            if path[0] in SECRET_KEYS or path[-1] in SECRET_KEYS:
                raise ValueError(f"set_config will not write the secret {key!r} through a "
                                 "shell command")
            jpath = json.dumps(path)
            if value is None:
                filters.append(f"delpaths([{jpath}])")
            else:
                filters.append(f"setpath({jpath}; $v{i})")
                args.append(f"--argjson v{i} {shlex.quote(json.dumps(value))}")
        command = (f"{registration_wait(CONFIG_JSON, REGISTER_WAIT)} && {{ "
                   f"{config_json_edit(CONFIG_JSON, ' '.join(args), ' | '.join(filters))}; }}")
        result = self.run(command)
        if not result.ok:
            raise CommandFailed(result)

    # --- bootloader -------------------------------------------------------------------------
    def boot_files(self) -> dict[str, str]:
        """The bootloader environment files on the boot partition (NULs dropped)."""
        names = (*hostdisk.UBOOT_FILES, *hostdisk.GRUB_FILES)
        out = self.check(
            f"cd {BOOT_MNT} && for f in {' '.join(names)}; do [ -f \"$f\" ] && "
            "{ echo \"==> $f\"; tr -d '\\000' < \"$f\"; echo; }; done; true",
            read_only=True)
        files: dict[str, str] = {}
        current = None
        for line in out.splitlines():
            if line.startswith("==> "):
                current = line[4:]
                files[current] = ""
            elif current is not None:
                files[current] += line + "\n"
        return files

    def boot_state(self) -> BootState:
        """``resin_root_part``, ``upgrade_available``, ``bootcount`` as the bootloader will
        read them next boot: U-Boot's resinOS_uEnv.txt + bootcount.env, or GRUB's grubenv
        (by the device type's ``bootloader``)."""
        files = self.boot_files()
        env: dict[str, str] = {}
        names = hostdisk.GRUB_FILES if self.bootloader == "grub" else hostdisk.UBOOT_FILES
        found = [n for n in names if n in files]
        if not found:
            raise OSContractError(f"no {self.bootloader} environment ({', '.join(names)}) on "
                                  f"{BOOT_MNT}; it has {sorted(files) or 'none of them'}")
        if self.bootloader == "grub":
            env = parse.env_file(files[found[0]])
        else:
            for name in found:
                env.update(parse.env_file(files[name]))
        return parse.boot_state(env)

    def rollback_markers(self) -> set[str]:
        """Which of the five rollback breadcrumb/result files exist in /mnt/state."""
        out = self.check(f"cd {STATE_MNT} && for m in {' '.join(MARKERS)}; do "
                         '[ -e "$m" ] && echo "$m"; done; true', read_only=True)
        return {m for m in out.split() if m in MARKERS}

    def health_variables(self) -> dict[str, str]:
        """``rollback-health-variables``: what hostapp-update recorded for the health check
        (``BALENAOS_ROLLBACK_VPNONLINE``); empty if there is no such file."""
        out = self.check(f"cat {HEALTH_VARIABLES} 2>/dev/null; true", read_only=True)
        return parse.env_file(out)

    # --- rollbacks, provoked the way balenaOS's own tests do -----------------------------------
    def shorten_health_check(self, count: int, timeout: int) -> None:
        """After an update and before its reboot: make the new root's health check give up
        after ``count`` checks ``timeout`` s apart (15 x 60 s on balenaOS). The values live only
        in the new root's ``rollback-health``, so its copy is edited, as balenaOS's tests do."""
        self.check(shorten_health_check_command(count, timeout))

    def break_update(self, how: UpdateBreak) -> None:
        """Break the installed update in place, as balenaOS's tests do, so one good update
        image serves every rollback test. ``init``: delete the new root's init (it cannot boot;
        the bootloader falls back). ``health``: put /dev/null where the new root has what its
        health check needs (balenaEngine's CLI, ``usr/bin/balena-engine``). ``vpn``: the same
        over its openvpn (the health check needs the VPN back if it was online)."""
        self.check(break_update_command(how, self.is_reference_os))

    def vpn_configured(self) -> bool:
        """Whether os-config wrote the API's VPN configuration (balenaOS's openvpn.service
        starts only then)."""
        return self.check(f"[ -s {VPN_CONFIG} ] && echo yes; true", read_only=True) == "yes"

    def wait_vpn(self, timeout: float = 180.0) -> None:
        """Wait for the VPN to be online (openvpn's up script's marker), the state
        hostapp-update records for the health check."""
        last = ["nothing read yet"]

        def probe() -> bool:
            out = self.check(f"[ -e {VPN_ONLINE} ] && echo online; systemctl is-active "
                             "openvpn.service; true", read_only=True)
            last[0] = f"openvpn.service {' '.join(out.split()) or '?'}"
            return "online" in out.split()

        def seen() -> str:
            return f"{last[0]}; its log ends:\n{self.unit_log('openvpn.service')[-1500:]}"

        self.dut.poll(probe, timeout, f"the VPN to be online ({VPN_ONLINE})", seen,
                      interval=1.0)

    def wait_committed(self, timeout: float = 420.0) -> BootState:
        """Wait for the health check to commit a booted update (``upgrade_available=0``, no
        breadcrumbs). The default covers balenaOS's unshortened health check (the engine's
        start, 60 s, one check) under QEMU's emulation. Reads over SSH when possible: the OS
        announces the commit on the console, which must not cut into a console command."""
        reader = self.via_ssh() if self.dut.ssh.available else self
        last: list[str] = ["nothing read yet"]

        def probe() -> BootState | None:
            state = reader.boot_state()
            markers = reader.rollback_markers()
            last[0] = f"{state}; markers {sorted(markers) or 'none'}"
            if state.upgrade_available == 0 and not markers & BREADCRUMBS:
                return state
            return None

        return self.dut.poll(probe, timeout, "the health check to commit the update "
                             "(upgrade_available=0, breadcrumbs removed)", lambda: last[0],
                             interval=0.5)

    # --- boots ------------------------------------------------------------------------------
    def boot_signature(self) -> tuple[re.Pattern[bytes], str]:
        # Not learnt yet (the first boot of an image the session did not build): every
        # bootloader's banner, the reference OS's included.
        if self._learned.reference:
            return parse.BOOT_LINE, "the bootloader's HIL-BOOT line (a new boot)"
        return BOOTLOADER_BANNER[self.bootloader], f"the board to boot ({self.bootloader} starting)"

    def boot_record(self, hit: Hit) -> BootRecord:
        printed: BootLine | None = None
        if self._learned.reference and hit.groups:
            printed = parse.boot_line(hit.groups)
        stored = None
        disk = self.dut.disk
        if disk is not None and printed is not None:
            # printed after the bootloader saved its count: the file holds this boot's state
            stored = disk.boot_state()
        return BootRecord(hit.start, hit.end, printed, stored)

    def ssh_host_key(self) -> str:
        """SHA-256 fingerprint of the SSH host key the device presents (part of its identity:
        it must not change across reboots and updates)."""
        import base64
        import hashlib

        key = self.dut.ssh.host_key()
        digest = hashlib.sha256(key.asbytes()).digest()
        return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"

    def listening_tcp_ports(self) -> set[int]:
        """TCP ports something listens on (from /proc/net/tcp{,6}: no netstat needed)."""
        out = self.check("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true", read_only=True)
        ports = set()
        for line in out.splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and f[3] == "0A" and ":" in f[1]:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
        return ports

    # --- /data --------------------------------------------------------------------------------
    def put_checked_file(self, name: str, kib: int = 512) -> str:
        """Write ``kib`` KiB of random data and its md5sum into the data directory, synced.
        Returns the file's path."""
        d = f"{self.data_dir}/hil-tests"
        self.check(f"mkdir -p {d} && cd {d} && dd if=/dev/urandom of={name} bs=1024 "
                   f"count={int(kib)} 2>/dev/null && md5sum {name} > {name}.md5 && "
                   f"sync {name} {name}.md5 && sync .", timeout=120)
        return f"{d}/{name}"

    def checked_file(self, name: str) -> str | None:
        """None if the file written by ``put_checked_file`` is there and matches its checksum,
        else what is wrong."""
        d = f"{self.data_dir}/hil-tests"
        r = self.run(f"cd {d} && md5sum -c {name}.md5 2>&1", read_only=True)
        return None if r.ok else (r.stdout.strip() or f"md5sum -c exited {r.exit_code}")

    def ready_line(self, start: int, end: int | None = None) -> tuple[str, str] | None:
        """The reference OS's ``HIL-READY <version> <hostname>`` between two offsets."""
        m = re.search(rb"HIL-READY (\S+) (\S+)", self.dut.rig.log.read(start, end))
        return (m.group(1).decode(), m.group(2).decode()) if m else None

    # --- host OS update ---------------------------------------------------------------------
    def _file_server(self) -> FileServer:
        from hil.os.transfer import FileServer

        if self._learned.file_server is None:
            network = self.dut.rig.network
            if network is None:
                raise InfraError("the rig has no network part: the device cannot download an "
                                 "update from the rig host", part="network",
                                 rig=self.dut.rig.name)
            self._learned.file_server = FileServer(network.host_address)
        return self._learned.file_server

    def _update_command(self, image: UpdateImage, url: str | None) -> str:
        if image.kind == "rootfs":
            # the reference OS's hostapp-update takes a rootfs and downloads URLs itself
            return f"hostapp-update -f {shlex.quote(url or image.source)}"
        if image.kind == "hostapp":
            # balenaOS's takes a local bundle file: fetch it onto resin-data first
            local = f"{DATA_MNT}/hil-hostapp-update.tar"
            return (f"(curl -fsS -o {local} {shlex.quote(url or '')} || "
                    f"wget -q -O {local} {shlex.quote(url or '')}) && "
                    f"hostapp-update -f {local}; rc=$?; rm -f {local}; exit $rc")
        return f"hostapp-update -i {shlex.quote(image.source)}"

    def _prepared(self, image: UpdateImage) -> Path | None:
        if image.kind == "ref":
            return None
        if image.kind == "rootfs":
            from hil.os.transfer import shrink_rootfs

            return shrink_rootfs(image.path, self.dut.rig.runtime / "updates")
        return image.path

    def hostapp_update(self, image: UpdateImage, timeout: float = 900.0) -> UpdateResult:
        """Install ``image`` into the inactive root with the OS's ``hostapp-update`` (no
        reboot). The rig host serves the file over HTTP and the device pulls it (see
        hil/os/transfer.py for why); the command runs over SSH where the rig has a network."""
        target = self.roots().inactive
        path = self._prepared(image)
        t0 = time.monotonic()
        if path is None:
            result = self._run_update(self._update_command(image, None), timeout)
        else:
            with self._file_server().serving(path) as url:
                result = self._run_update(self._update_command(image, url), timeout)
        seconds = time.monotonic() - t0
        self._learned.last_update_seconds = seconds
        if not result.ok:
            raise CommandFailed(result)
        log.info("hostapp-update of %s into %s took %.1fs", image.describe(), target, seconds)
        return UpdateResult(image, target, seconds, result.stdout)

    def _run_update(self, command: str, timeout: float) -> Result:
        if self.dut.ssh.available:
            return self.dut.ssh.run(command, timeout)
        # no network: only a reference image reference could work, over the console
        return self.dut.run(command, timeout)

    @property
    def last_update_seconds(self) -> float | None:
        return self._learned.last_update_seconds

    def start_hostapp_update(self, image: UpdateImage) -> tuple[RunningUpdate, Callable[[], None]]:
        """Start an update and return at once (for cutting the power during it). The second
        value stops serving the file; call it when done with the update."""
        target = self.roots().inactive
        path = self._prepared(image)
        stack = contextlib.ExitStack()
        url = stack.enter_context(self._file_server().serving(path)) if path else None
        channel = self.dut.ssh.start(self._update_command(image, url))
        return RunningUpdate(channel, target, time.monotonic()), stack.close

    # --- balenaEngine ---------------------------------------------------------------------------
    def has_engine(self) -> bool:
        """Whether the OS runs containers (has balenaEngine's CLI)."""
        return self.has_tools(ENGINE)

    def wait_engine(self, timeout: float = 300.0) -> None:
        """Wait for balenaEngine to answer. It starts at every boot, after the shell is up, and
        under QEMU's emulation takes most of a minute. While systemd still has balena.service
        starting (Type=notify: the engine has not said its API listens) the engine's CLI is
        not run: each run of that Go program costs a board under emulation 1-6 s of its one
        CPU, which the engine's own start then waits for."""
        last = ["nothing yet"]

        def probe() -> bool:
            r = self.run(f"s=$(systemctl is-active {ENGINE_UNIT} 2>/dev/null); "
                         f"if [ \"$s\" = activating ]; then echo \"{ENGINE_UNIT} $s\"; false; "
                         f"else {ENGINE} info --format '{{{{.ServerVersion}}}}' 2>&1; fi",
                         timeout=120, read_only=True)
            last[0] = f"exit {r.exit_code}: {r.stdout.strip()[-300:]}"
            return r.ok

        self.dut.poll(probe, timeout, f"balenaEngine to answer (`{ENGINE} info`)",
                      lambda: last[0], interval=2.0)

    def load_image(self, image: AppImage, timeout: float = 600.0) -> str:
        """Make sure the engine holds ``image`` (same image ID) and return its tag. The archive
        goes over SSH into ``balena-engine load``, as a bench with no registry delivers one;
        nothing is sent when the device already has it. Waits for the engine where it
        does not answer yet."""
        if self._holds(image.tag, image):
            return image.tag
        self.wait_engine()
        if not self.dut.ssh.available:
            raise InfraError(f"cannot send app image {image.tag} to the device: the rig has no "
                             "network path to its SSH", part="container", rig=self.dut.rig.name)
        result = self.dut.ssh.run(f"{ENGINE} load", timeout, stdin=image.path.read_bytes())
        check(result.ok, f"balenaEngine did not load app image {image.tag} "
                         f"({image.path.stat().st_size} bytes, `{ENGINE} load` exit "
                         f"{result.exit_code}):\n{result.stdout[-2000:]}")
        self._learned.images[image.tag] = (self.dut.boots, image.id)
        return image.tag

    def pull_image(self, reference: str, image: AppImage, timeout: float = 600.0) -> str:
        """Make sure the engine holds ``image`` as ``reference`` (a registry's name for it,
        hil/appregistry.py), pulling it as a fleet device does; nothing is fetched when the
        device already has it. The pulled image must be ``image`` (same image ID). Waits for
        the engine where it does not answer yet."""
        if self._holds(reference, image):
            return reference
        self.wait_engine()
        r = self.run(f"{ENGINE} pull {shlex.quote(reference)} 2>&1", timeout=timeout)
        check(r.ok, f"balenaEngine did not pull app image {reference} from the rig's "
                    f"registry (`{ENGINE} pull` exit {r.exit_code}):\n{r.stdout[-2000:]}")
        got = self._image_id(reference)
        check(got == image.id, f"balenaEngine pulled {reference} as image {got or 'nothing'}, "
                               f"not the pushed {image.id}")
        self._learned.images[reference] = (self.dut.boots, image.id)
        return reference

    def _holds(self, reference: str, image: AppImage) -> bool:
        """Whether the engine holds ``image`` as ``reference``. Asked once per boot: the
        suites remove no app image they were given, and the engine's CLI takes seconds to
        start under QEMU's emulation. Its answer also says the engine answers."""
        if self._learned.images.get(reference) == (self.dut.boots, image.id):
            return True
        if self._image_id(reference) != image.id:
            return False
        self._learned.images[reference] = (self.dut.boots, image.id)
        return True

    def _image_id(self, reference: str) -> str:
        r = self.run(f"{ENGINE} image inspect --format '{{{{.Id}}}}' {shlex.quote(reference)}"
                     " 2>/dev/null", timeout=120, read_only=True)
        return r.stdout.strip() if r.ok else ""

    def log_mark(self) -> str:
        """Write a unique line to the system log; ``log_since`` returns what came after it."""
        mark = f"pytest-hil-mark-{secrets.token_hex(6)}"
        self.check(f"logger -t pytest-hil {mark}")
        return mark

    def log_since(self, mark: str) -> str:
        """The system log after ``mark`` ("" until the mark itself is there)."""
        _, found, after = self.check(SYSTEM_LOG, timeout=60, read_only=True).partition(mark)
        return after if found else ""

    def restart_service(self, unit: str) -> None:
        """``systemctl restart UNIT`` (balena, chronyd), its drop-ins read again."""
        self.check(f"systemctl daemon-reload && systemctl restart {shlex.quote(unit)}",
                   timeout=120)

    def restart_engine(self) -> None:
        """Restart balena.service and wait until the new engine answers."""
        self.restart_service("balena")
        self.wait_engine()

    def engine_log(self) -> str:
        """balena.service's log: the engine's own lines and systemd's about the unit."""
        return self.unit_log("balena.service")

    def unit_log(self, unit: str) -> str:
        """A systemd unit's log (``journalctl -u``): its own lines and systemd's about it."""
        return self.check(f"journalctl -u {shlex.quote(unit)} --no-pager -o cat", timeout=60,
                          read_only=True)

    def unit_property(self, unit: str, name: str) -> str:
        """One property of a systemd unit (``systemctl show -p NAME --value``): ActiveState,
        Result, ActiveEnterTimestampMonotonic..."""
        return self.check(f"systemctl show --no-pager -p {shlex.quote(name)} --value "
                          f"{shlex.quote(unit)}", read_only=True).strip()

    def hang_engine(self) -> None:
        """Stop (SIGSTOP) the engine's containerd: an engine that no longer answers, as
        balenaOS's watchdog test hangs it. A restart of the unit clears it."""
        name = ENGINE_CONTAINERD[self.is_reference_os]
        self.check(f"kill -STOP $(pidof {name})")

    def engine_tcp_api(self) -> str | None:
        """What the engine's API on TCP 2375 answers to ``GET /_ping`` (``OK``, or the
        status), or None when nothing listens there (a production device)."""
        try:
            r = http_request(self.dut, ENGINE_TCP_PORT, "GET", "/_ping", timeout=30.0)
        except ConnectionRefusedError:
            return None
        return r.text if r.status == 200 else f"HTTP {r.status} {r.text[:200]}"

    def supervisor(self) -> SupervisorAPI:
        return SupervisorAPI(self.dut)

    # --- data ---------------------------------------------------------------------------------
    def has_tools(self, *names: str) -> bool:
        names_q = " ".join(shlex.quote(n) for n in names)
        return self.run(f"for t in {names_q}; do command -v \"$t\" >/dev/null || exit 1; "
                        "done").ok

    def fsck_online(self, mountpoint: str = DATA_MNT) -> tuple[bool, str] | None:
        """Check the ext4 filesystem mounted at ``mountpoint`` while it is frozen (fsfreeze
        flushes the journal and holds writers, so the on-disk image is consistent). Returns
        (clean, e2fsck output), or None where the OS lacks e2fsck or fsfreeze."""
        if not self.has_tools("e2fsck", "fsfreeze"):
            return None
        m = parse.mount_at(self.mounts(), mountpoint)
        if m is None:
            raise OSContractError(f"nothing is mounted at {mountpoint}")
        dev = m.source.split("[", 1)[0]
        result = self.run(
            f"sync; fsfreeze -f {mountpoint} || exit 99; trap 'fsfreeze -u {mountpoint}' EXIT; "
            f"e2fsck -f -n {shlex.quote(dev)} 2>&1", timeout=300)
        if result.exit_code == 99:
            return None
        return result.exit_code == 0, result.stdout

    def kernel_fs_errors(self, device: str) -> list[str]:
        """Kernel log lines reporting errors on ``device`` (e.g. "EXT4-fs error (vda5)")."""
        name = device.rsplit("/", 1)[-1].split("[", 1)[0]
        out = self.run("dmesg").stdout
        return [ln for ln in out.splitlines()
                if name in ln and re.search(r"(?i)EXT4-fs (error|warning)|I/O error|"
                                            r"corrupt", ln)]


def shorten_health_check_command(count: int, timeout: int) -> str:
    """balenaOS's tests' own command (the find: the new root's layout differs between OSes)."""
    return (f'f=$(find {INACTIVE}/ | grep "bin/rollback-health"); if [ -n "$f" ]; then '
            f'sed -i -e "s/COUNT=.*/COUNT={int(count)}/g" '
            f'-e "s/TIMEOUT=.*/TIMEOUT={int(timeout)}/g" $f && sync; '
            'else echo "no bin/rollback-health in the new root" >&2; false; fi')


def break_update_command(how: UpdateBreak, reference_os: bool) -> str:
    target = UPDATE_BREAKS[how][reference_os]
    action = "rm" if how == "init" else "ln -sf /dev/null"
    return (f'f={target}; if [ -e "$f" ] || [ -L "$f" ]; then {action} $f && sync; '
            'else echo "the new root has no $f" >&2; false; fi')


def secrets_in(text: bytes, secrets: Iterable[tuple[str, str]]) -> list[str]:
    """Names of the secrets (name, value) found in ``text``, plain or base64-encoded."""
    from hil.os.secret import encodings

    compact = re.sub(rb"\s", b"", text)
    found = []
    for name, value in secrets:
        forms = encodings(value)
        if forms[0] in text or any(f in compact for f in forms):
            found.append(name)
    return found
