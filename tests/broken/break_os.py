"""A pytest plugin (``-p tests.broken.break_os``) that breaks promises of the OS at runtime, on
the booted reference OS, so each suite can be shown to fail, naming the promise, when the OS does
not keep it. ``HIL_BREAK`` picks the breaks (comma-separated).

Each break is what a faulty OS would do, done to the running device (the reference OS builder
has no such modes): nothing in the suites or the adapter knows about it. Breaks are idempotent
and re-applied before every test, since a failed test power-cycles the board (which would heal a
runtime break).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from hil.dut import Dut
from hil.os import BalenaOS
from hil.os.balena import CONFIG_JSON_SETTLE

# Overwrite a script's first bytes in place (an update's root is shrunk to its content: no free
# block for a new file): it now exits at once, the rest is never read.
_STUB = "printf '#!/bin/sh\\nexit 0 # broken\\n' | dd of={path} conv=notrunc 2>/dev/null"


def _stub_on_root(path: str) -> str:
    """``path`` on the read-only root stubbed, the root made writable for it. Right after boot,
    with the services still starting, the remount read-only failed with EBUSY: a write in flight
    on the root (with relatime, the first read of each file writes its atime). So the root is
    writable without atime updates, and the remount is tried a few times."""
    return (f"grep -q '^exit 0 # broken' {path} || "
            "{ mount -o remount,rw,noatime / && " + _STUB.format(path=path) + " && sync && "
            "for i in 1 2 3 4 5 6 7 8 9 10; do mount -o remount,ro / 2>/dev/null && break; "
            "sleep 0.2; done; grep -q '^[^ ]* / [^ ]* ro[, ]' /proc/mounts; }")


def _unit_does_nothing(unit: str, command: str = "/bin/true") -> str:
    # a runtime drop-in replaces the unit's program, as a broken OS would ship it
    path = f"/run/systemd/system/{unit}.d/broken.conf"
    return (f"[ -f {path} ] || {{ mkdir -p /run/systemd/system/{unit}.d && "
            f"printf '[Service]\\nExecStart=\\nExecStart={command}\\n' > {path} && "
            "systemctl daemon-reload; }")


def _restart_chrony_without(word: str) -> str:
    # chronyd restarted with the config as it is now
    return (f"if grep -q {word} /run/chrony/chrony.conf; then "
            f"sed -i /{word}/d /run/chrony/chrony.conf && systemctl restart chronyd.service; fi")


# A config-apply already running when a broken copy is bound over it (config.json changed:
# the registration, the supervisor) goes on with the script it opened and may undo the break
# (the hostname it sets): the broken copy runs once that run has ended.
_AFTER_RUNNING_APPLY = CONFIG_JSON_SETTLE + "; "


def _supervisor_copy(sed: str) -> str:
    """A copy of the supervisor changed by ``sed`` bound over it, and the unit restarted."""
    return ("grep -q '# broken' /usr/lib/hil/supervisor.py || "
            f"{{ sed '{sed}' /usr/lib/hil/supervisor.py > /run/supervisor-broken.py && "
            "mount --bind /run/supervisor-broken.py /usr/lib/hil/supervisor.py && "
            "systemctl restart --no-block balena-supervisor.service; }")


BREAKS: dict[str, str] = {
    # /data is not persisted: a tmpfs hides the resin-data partition (an OS that forgot to
    # mount it). Re-applied before each test; a reboot inside a test brings the real one back,
    # which is exactly when the suite looks for what it wrote.
    "data-not-persisted": (
        "grep -q ' /data tmpfs ' /proc/mounts || "
        "{ mount -t tmpfs tmpfs /mnt/data && mkdir -p /mnt/data/resin-data && "
        "mount -t tmpfs tmpfs /data; }"),
    # the root is left writable (an OS that forgot its read-only root)
    "root-writable": "grep -q '^[^ ]* / [^ ]* rw[, ]' /proc/mounts || mount -o remount,rw /",
    # the disk watchdog reads its test file through the page cache (no O_DIRECT), so a disk
    # that fails its reads goes unseen: a copy so changed is bound over the daemon, restarted
    "disk-watchdog-reads-cache": (
        "grep -q '# broken' /usr/bin/disk-watchdogd || "
        "{ sed 's/ | os.O_DIRECT)/)  # broken/' /usr/bin/disk-watchdogd > /run/dwd-broken && "
        "chmod 755 /run/dwd-broken && mount --bind /run/dwd-broken /usr/bin/disk-watchdogd && "
        "systemctl reset-failed disk-watchdogd; systemctl restart disk-watchdogd; }"),
    # the OS prints its provisioning key on the console (a debug line left in a boot script)
    "console-leaks-key": "jq -r '\"provisioning with \" + .apiKey' /mnt/boot/config.json "
                         "> /dev/console",
    # the OS ignores config.json's dnsServers: the script that hands them to dnsmasq is gone
    "dns-servers-ignored": ("grep -q ' /usr/bin/balena-net-config ' /proc/mounts || "
                            "mount --bind /dev/null /usr/bin/balena-net-config"),
    # the OS ignores config.json's os.udevRules: os-udevrules, which installs them, is gone
    "udev-rules-ignored": ("grep -q ' /usr/sbin/os-udevrules ' /proc/mounts || "
                           "mount --bind /dev/null /usr/sbin/os-udevrules"),
    # the OS ignores config.json's os.network: os-networkmanager, which writes NetworkManager's
    # configuration from it, is gone
    "network-settings-ignored": ("grep -q ' /usr/sbin/os-networkmanager ' /proc/mounts || "
                                 "mount --bind /dev/null /usr/sbin/os-networkmanager"),
    # the OS ignores config.json's hostname / uuid and keeps a fixed one: a config-apply that
    # names the device "balena" is bound over it and run (so a later change of config.json,
    # the registration's among them, applies the fixed name again)
    "hostname-ignored": (
        "grep -q '^name=balena # broken$' /usr/lib/hil/config-apply || "
        "{ sed 's/^name=.c_hostname$/name=balena # broken/' /usr/lib/hil/config-apply "
        "> /run/config-apply-hostname && chmod 755 /run/config-apply-hostname && "
        "mount --bind /run/config-apply-hostname /usr/lib/hil/config-apply; } && "
        + _AFTER_RUNNING_APPLY + "/usr/lib/hil/config-apply runtime"),
    # the running OS's rollback-altboot does nothing (so after a failed update the bootloader
    # falls back, but the old OS never cleans up): a root made writable for the purpose
    "no-altboot-rollback": _stub_on_root("/usr/bin/rollback-altboot"),
    # the new OS's health check never rolls back: applied to each update right after
    # hostapp-update wrote it (see pytest_configure)
    "no-health-rollback": "true",
    # chrony ignores the servers config.json's ntpServers gives it ("chrony misconfigured"):
    # its config loses the sourcedir the OS writes them to. (Emptying that file instead would
    # not last: the OS rewrites it whenever config.json changes, e.g. at registration.)
    "chrony-no-servers": _restart_chrony_without("sourcedir"),
    # chrony runs without `makestep`: it slews a clock minutes off instead of stepping it
    "chrony-no-makestep": _restart_chrony_without("makestep"),
    # the OS does not check its filesystems at boot (e2fsck does nothing): on the root, made
    # writable for the purpose, as no-altboot-rollback
    "no-boot-fsck": _stub_on_root("/sbin/e2fsck"),
    # the OS ignores a removed remove_me_to_reset: the flag is put back at once, nothing is
    # reset at the next boot
    "no-reset": (
        "[ -e /run/hil-no-reset ] || { touch /run/hil-no-reset; ( while :; do "
        "for f in /mnt/state/remove_me_to_reset /mnt/data/remove_me_to_reset; do "
        "[ -e $f ] || { touch $f; sync; }; done; sleep 0.2; done ) "
        "</dev/null >/dev/null 2>&1 & }"),
    # the engine's watchdog never fires: healthdog pets it whatever the engine's health (its
    # check is /bin/true), from the engine's next start on (a drop-in, as balenaOS's own test
    # disables the check, which the suite's restart reads)
    "no-engine-watchdog": (
        "d=/run/systemd/system/balena.service.d; [ -e $d/zz-broken.conf ] || "
        "{ mkdir -p $d && printf '[Service]\\nEnvironment=BALENAD_HEALTHDOG_HEALTHCHECK=/bin/true"
        "\\n' > $d/zz-broken.conf && systemctl daemon-reload; }"),
    # the engine does not masquerade its containers' traffic (as with `--iptables=false`): its
    # NAT rule is deleted whenever it is there (it comes back with every start of the engine)
    "no-engine-nat": (
        "[ -e /run/hil-no-nat ] || { touch /run/hil-no-nat; ( while :; do "
        "iptables -t nat -D POSTROUTING -s 10.114.101.0/24 ! -o balena0 -j MASQUERADE "
        "2>/dev/null; sleep 1; done ) </dev/null >/dev/null 2>&1 & }"),
    # the supervisor's firewall chain is built but never reached: INPUT's jump to it is deleted
    # whenever it is there
    "firewall-not-in-input": (
        "[ -e /run/hil-no-fw ] || { touch /run/hil-no-fw; ( while :; do "
        "iptables -D INPUT -j BALENA-FIREWALL 2>/dev/null; sleep 1; done ) "
        "</dev/null >/dev/null 2>&1 & }"),
    # the OS mounts /data without write barriers (ext4 barrier=0): fsync returns once the
    # records reached the disk's write cache, never flushed from there; a power cut loses them
    "no-disk-flush": "mount -o remount,barrier=0 /mnt/data",
    # the OS ignores config.json's balenaRootCA: a config-apply that never reads the key is
    # bound over it and run (so the trust store loses the CA, now and at every later change
    # of config.json), and the engine restarted to read the store again
    "root-ca-ignored": (
        "grep -q '^c_ca=$' /usr/lib/hil/config-apply || "
        "{ sed 's/^c_ca=.*/c_ca=/' /usr/lib/hil/config-apply > /run/config-apply-broken && "
        "chmod 755 /run/config-apply-broken && "
        "mount --bind /run/config-apply-broken /usr/lib/hil/config-apply && "
        + _AFTER_RUNNING_APPLY + "/usr/lib/hil/config-apply runtime && "
        "systemctl stop balena.service && "
        "systemctl start --no-block balena.service balena-supervisor.service; }"),
    # the OS ignores config.json's os.kernel.extraFirmwareVol: os-extra-firmware does nothing,
    # and the firmware loader searches only where it always does (/lib/firmware)
    "extra-firmware-ignored": (_unit_does_nothing("os-extra-firmware.service") + " && "
                               "printf /lib/firmware > /sys/module/firmware_class/parameters/path"),
    # a device node the device type promises disappears
    "no-gpiochip0": "rm -f /dev/gpiochip0",
    # the kernel logs under-voltage, as a Raspberry Pi's does on a weak supply
    "under-voltage": ("echo 'hwmon hwmon1: Under-voltage detected! (0x00050005)' "
                      "> /dev/kmsg"),
    # sshd.socket is never recovered after its trigger limit stopped it: the recovery timer is
    # stopped and its service does nothing
    "no-sshd-socket-recovery": (_unit_does_nothing("recover-sshd-socket.service") +
                                " && systemctl stop recover-sshd-socket.timer"),
    # the recovery restarts sshd.socket whatever its state (and says it was tripped)
    "recovery-restarts-healthy-socket": _unit_does_nothing(
        "recover-sshd-socket.service", "/bin/sh -c \"echo sshd.socket was stopped by trigger "
        "rate limit, restarting; systemctl restart sshd.socket\""),
    # os.sshKeys changed at runtime are never applied: os-sshkeys.service does nothing
    "os-sshkeys-ignored": _unit_does_nothing("os-sshkeys.service"),
    # a hostname changed at runtime is never announced over mDNS: config-apply no longer
    # restarts avahi (balenaOS restarts it with its hostname service)
    "avahi-keeps-old-name": (
        "grep -q '# avahi broken$' /usr/lib/hil/config-apply || "
        "{ sed 's/systemctl try-restart --no-block avahi-daemon.service/true # avahi broken/' "
        "/usr/lib/hil/config-apply > /run/config-apply-avahi && "
        "chmod 755 /run/config-apply-avahi && "
        "mount --bind /run/config-apply-avahi /usr/lib/hil/config-apply; }"),
    # the OS's firewall rejects every connection it opens over the wired interface (the one
    # its route to the rig host leaves by); what comes in (SSH) still works
    "wired-rejects-out": (
        "d=$(ip -o route get 10.0.2.2 | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'); "
        "iptables -C OUTPUT -o $d -p tcp --syn -j REJECT 2>/dev/null || "
        "iptables -I OUTPUT -o $d -p tcp --syn -j REJECT"),
    # the OS has no mDNS responder: avahi-daemon's program waits and answers nothing (the
    # unit restarted unless what runs already is that program)
    "no-mdns": (_unit_does_nothing("avahi-daemon.service", "/bin/sleep 86400") + " && "
                "{ [ \"$(cat /proc/$(systemctl show -p MainPID --value avahi-daemon.service)"
                "/comm 2>/dev/null)\" = sleep ] || systemctl restart avahi-daemon.service; }"),
    # os-config never fetched its configuration (as if it had not run): stopped, and the
    # journal holding its lines rotated away
    "os-config-never-ran": ("systemctl stop os-config.service && journalctl --rotate -q && "
                            "journalctl --vacuum-time=1s -q"),
    # the supervisor lets any caller in on a production device (an API without its key check):
    # a copy that never asks for a key is bound over it, and the unit restarted from there
    "supervisor-ignores-key": _supervisor_copy(
        's/return config().get("developmentMode") is not True/return False  # broken/'),
    # the supervisor answers POST /v1/blink but blinks nothing (the LED stays as it was)
    "supervisor-no-blink": _supervisor_copy(
        "s/^            BLINK.identify()$/            pass  # broken/"),
    # the supervisor ignores the apps' update locks (it finds none)
    "supervisor-ignores-lock": _supervisor_copy(
        "s/^        return held$/        return []  # broken/"),
    # the supervisor recreates every service of an app when one service changes (the
    # container's name digests the whole app, not the service)
    "supervisor-recreates-all": _supervisor_copy(
        r"s/json.dumps(spec, sort_keys=True)\(.*\)$/json.dumps(app, sort_keys=True)\1  # broken/"),
    # the supervisor's update timer fires at fixed times (no random delay): a drop-in, the
    # timer re-armed
    "timer-not-randomized": (
        "d=/run/systemd/system/update-balena-supervisor.timer.d; [ -e $d/zz-broken.conf ] || "
        "{ mkdir -p $d && printf '[Timer]\\nRandomizedDelaySec=0\\n' > $d/zz-broken.conf && "
        "systemctl daemon-reload && systemctl restart update-balena-supervisor.timer; }"),
}

# (hostapp-update leaves the new root mounted read-write, as balenaOS does)
DISABLE_HEALTH_ROLLBACK = (
    _STUB.format(path="/mnt/sysroot/inactive/usr/bin/rollback-health") + " && sync")


def _names() -> list[str]:
    names = [n for n in os.environ.get("HIL_BREAK", "").split(",") if n]
    unknown = [n for n in names if n not in BREAKS]
    if not names or unknown:
        raise pytest.UsageError(f"HIL_BREAK={','.join(names)!r}: choose from "
                                f"{', '.join(BREAKS)} (comma-separated)")
    return names


# breaks a faulty OS makes at every boot, so re-applied after each power-on inside a test too
# (a test that cuts the power several times meets the broken OS at each cut)
AT_EVERY_BOOT = {"no-disk-flush"}


def pytest_configure(config: pytest.Config) -> None:
    at_boot = [n for n in _names() if n in AT_EVERY_BOOT]
    if at_boot:
        power_on = Dut.power_on

        def power_on_broken(self: Dut) -> Any:
            record = power_on(self)
            for name in at_boot:
                self.run_check(BREAKS[name], timeout=60)
            return record

        Dut.power_on = power_on_broken  # type: ignore[method-assign]
    if "no-health-rollback" in _names():
        original = BalenaOS.hostapp_update

        def hostapp_update(self: BalenaOS, image: Any, timeout: float = 900.0) -> Any:
            result = original(self, image, timeout)
            self.check(DISABLE_HEALTH_ROLLBACK)
            return result

        BalenaOS.hostapp_update = hostapp_update  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _hil_break(dut: Dut) -> None:
    for name in _names():
        dut.run_check(BREAKS[name], timeout=60)
