"""/data persistence: what an app writes and syncs to /data is still there, byte for byte, after
a soft reboot and a hard power cut; and under power cuts at random moments every write the
device acknowledged (fsync returned), in /data or in the app's named volume, survives on a clean
filesystem. (/data and the app's volumes across a host OS update and a rollback: the rollback
suite checks them on the same updates it makes, one update per promise set.)
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import shlex
import time
from collections.abc import Callable

import pytest
from apps import APP_NAME, SERVICE, Apps

from hil.dut import Dut
from hil.errors import DeadlineError, HilError
from hil.os import HostOS, parse

ACK_TIMEOUT = 60.0  # the writer's first acknowledgements (a command over the console)


def _promise_kept(host_os: HostOS, name: str, after: str) -> None:
    problem = host_os.checked_file(name)
    assert problem is None, (f"a file and its checksum in {host_os.data_dir} did not survive "
                             f"{after}: {problem}")


def test_data_lives_on_the_data_partition(host_os: HostOS) -> None:
    data = host_os.data_dir
    mounts = host_os.mounts()
    # the mount that holds the data directory: the deepest mount point above it, and of
    # several at that point the last one mounted (it hides the others)
    holder = None
    for m in mounts:
        if (data == m.target or data.startswith(m.target.rstrip("/") + "/")) and \
                (holder is None or len(m.target) >= len(holder.target)):
            holder = m
    assert holder is not None, f"nothing is mounted at or above {data}"
    device = holder.source.split("[", 1)[0]
    labels = {dev: label for label, dev in host_os.labels().items()}
    assert labels.get(device) == "resin-data", (
        f"{data} is on {holder.source} ({holder.fstype}), not on the resin-data partition: "
        "nothing written there can persist")
    assert not holder.read_only, f"{data} is mounted read-only"
    assert holder.fstype == "ext4", f"{data} is {holder.fstype}, the contract says ext4"


def test_root_filesystem_is_read_only(host_os: HostOS) -> None:
    """balenaOS's root is read-only: only resin-state (the paths it binds over the root) and
    resin-data keep what is written, so nothing else can pile up or differ between devices."""
    root = [m for m in host_os.mounts() if m.target == "/"]
    assert root, "nothing is mounted at /"
    assert root[-1].read_only, (f"/ ({root[-1].source}, {root[-1].fstype}) is mounted "
                                "read-write: balenaOS's root filesystem is read-only")
    probe = host_os.run("touch /.hil-write-probe 2>&1 && rm -f /.hil-write-probe")
    assert not probe.ok, "a file could be created at / : the root filesystem is writable"


BY_STATE = ("active", "inactive", "resin-rootA", "resin-rootB", "resin-state", "resin-data")


def test_by_state_links_name_the_partitions(host_os: HostOS) -> None:
    """balenaOS's udev rule links each of its partitions on the booted disk by label in
    /dev/disk/by-state, and the two roots as ``active`` (the one booted) and ``inactive``."""
    out = host_os.check(f"for l in {' '.join(BY_STATE)}; do printf '%s %s\\n' $l "
                        "\"$(readlink -f /dev/disk/by-state/$l 2>/dev/null)\"; done",
                        read_only=True)
    links = {f[0]: f[1] for f in (line.split() for line in out.splitlines()) if len(f) == 2}
    missing = [name for name in BY_STATE if name not in links]
    assert not missing, f"/dev/disk/by-state lacks {missing}; it has {links}"
    labels = host_os.labels()
    wrong = {name: (links[name], labels.get(name)) for name in BY_STATE[2:]
             if links[name] != labels.get(name)}
    assert not wrong, f"by-state links that do not name their partition (link, label): {wrong}"
    booted = host_os.roots().mounted_active
    assert links["active"] == booted and {links["active"], links["inactive"]} == {
        labels["resin-rootA"], labels["resin-rootB"]}, (
        f"active -> {links['active']} and inactive -> {links['inactive']} must be the booted "
        f"root ({booted}) and the other one")


def test_file_survives_a_soft_reboot(dut: Dut, host_os: HostOS) -> None:
    host_os.put_checked_file("soft-reboot")
    dut.reboot()
    _promise_kept(host_os, "soft-reboot", "a soft reboot")


def test_file_survives_a_power_cut(dut: Dut, host_os: HostOS) -> None:
    host_os.put_checked_file("power-cut")
    dut.power_cycle()
    _promise_kept(host_os, "power-cut", "a hard power cut")


# --- power-cut fault injection ---------------------------------------------------------------

def _writer(directory: str, name: str, token: str, ack: str = " > /dev/console") -> str:
    """Append record 1, 2, ... to ``name``; fsync each; then print its number (the
    acknowledgement: to the console, or with ``ack=""`` to stdout). The file's creation is made
    durable (fsync of the directory) first."""
    pad = parse.record(1)[9:-1].decode()
    return (f"mkdir -p {directory} && cd {directory} && : > {name} && sync {name} . && i=0 && "
            f"while :; do i=$((i+1)); printf '%08d %s\\n' $i '{pad}' >> {name} || exit 1; "
            f"sync {name} || exit 1; echo \"HIL-ACK {token} $i\"{ack}; done")


def _read(dut: Dut, host_os: HostOS, paths: list[str]) -> dict[str, bytes]:
    """Each file's bytes, in one command; empty if it is gone (then every acknowledged record is
    lost). Over SSH where the rig has a network: no console message can cut into it."""
    reader = host_os.via_ssh() if dut.ssh.available else host_os
    # records are ASCII lines, so a line starting with \036 only ever is our separator;
    # anything else shows as U+FFFD
    out = reader.check(f"for f in {' '.join(paths)}; do printf '\\036%s\\n' $f; "
                       "if [ -e $f ]; then cat $f; fi; done", 120, read_only=True).encode()
    parts = out.split(b"\036")[1:]
    return {name.decode(): body for name, _, body in (p.partition(b"\n") for p in parts)}


# a writer started for one cut: (its token, its file's path on the host, who it is)
Started = tuple[str, str, str]


def _cut_while_writing(dut: Dut, host_os: HostOS, pytestconfig: pytest.Config,
                       start: Callable[[str], Started], after_boot: Callable[[], None]) -> str:
    """``--power-cuts`` times: start a writer (``start(file name)``), cut the power at a seeded
    random moment after its record 1..40 was acknowledged, power on (``after_boot``), then
    check that every acknowledged record of every file so far survived on a clean filesystem.
    Returns the figures for the soak's report."""
    cuts = int(pytestconfig.getoption("--power-cuts"))
    seed = int(pytestconfig.getoption("--power-cut-seed"))
    if cuts <= 0:
        pytest.skip("--power-cuts 0")
    rng = random.Random(seed)
    disk = dut.disk
    data_dev = host_os.labels().get("resin-data", "resin-data")
    online_fsck = host_os.has_tools("e2fsck", "fsfreeze")
    acked: dict[str, int] = {}  # file -> its last acknowledged record
    fs_checked: list[str] = []
    for cycle in range(1, cuts + 1):
        where = f"cut {cycle}/{cuts} (--power-cut-seed {seed})"
        at = dut.rig.log.end
        token, path, who = start(f"records-{cycle}")
        wanted = rng.randint(1, 40)
        dut.rig.log.wait_for(re.compile(rf"HIL-ACK {token} {wanted}\b".encode()), at,
                             ACK_TIMEOUT, f"{who} to acknowledge record {wanted}")
        # Deliberate: a random moment inside the append/fsync/print cycle (~15 ms on QEMU).
        time.sleep(rng.uniform(0.0, 0.02))
        dut.power_off()
        acked[path] = parse.acknowledged(dut.rig.log.read(at), token)
        if disk is not None:
            check = disk.fsck("resin-data")
            assert check.clean, (f"after {where} the data partition is not clean "
                                 f"(e2fsck, journal replayed):\n{check.summary()}")
            fs_checked.append("rig-side e2fsck after each cut")
        dut.power_on()  # after the rig's off-time
        files = _read(dut, host_os, list(acked))
        for fname, n in acked.items():
            got = parse.check_records(files.get(fname, b""))
            assert got.problem is None, f"after {where}, {fname}: {got.problem}"
            assert got.complete >= n, (
                f"after {where}: record {n} of {fname} was acknowledged (fsync returned) "
                f"before the power cut, but only records 1..{got.complete} survived "
                f"(then {got.tail})")
        errors = host_os.kernel_fs_errors(data_dev)
        assert not errors, f"after {where} the kernel reports:\n" + "\n".join(errors[:10])
        if online_fsck:
            result = host_os.fsck_online()
            if result is not None:
                assert result[0], f"after {where} e2fsck finds errors:\n{result[1][-2000:]}"
                fs_checked.append("e2fsck on the frozen filesystem after each boot")
        after_boot()
    host_os.check(f"rm -rf {' '.join({path.rsplit('/', 1)[0] for path in acked})}")
    figures = (f"{cuts} power cuts (--power-cut-seed {seed}): {sum(acked.values())} records "
               f"acknowledged, none lost; filesystem clean after each "
               f"({', '.join(set(fs_checked))})")
    if not fs_checked:
        pytest.skip(f"all acknowledged records survived {cuts} power cuts, but the filesystem "
                    "could not be checked: the rig's disk is not a file and the OS has no "
                    "e2fsck + fsfreeze")
    return figures


def test_acknowledged_writes_survive_random_power_cuts(dut: Dut, host_os: HostOS,
                                                        pytestconfig: pytest.Config) -> None:
    directory = f"{host_os.data_dir}/hil-power-cuts-{secrets.token_hex(3)}"

    def start(name: str) -> Started:
        token = secrets.token_hex(4)
        host_os.check(f"( {_writer(directory, name, token)} ) </dev/null >/dev/null 2>&1 &")
        return token, f"{directory}/{name}", "the writer in /data"

    # the soak's figures (-rP shows them): docs/reliability.md
    print(_cut_while_writing(dut, host_os, pytestconfig, start, lambda: None))


def test_app_volume_keeps_acknowledged_writes_across_power_cuts(
        dut: Dut, host_os: HostOS, apps: Apps, app: dict[str, str],
        pytestconfig: pytest.Config) -> None:
    """The same cuts while the app writes into its named volume; each record is acknowledged
    after its fsync in the container, through the engine's exec stream to the console."""
    sub = f"hil-power-cuts-{secrets.token_hex(3)}"
    volume = apps.inspect(app[SERVICE], '{{range .Mounts}}{{if eq .Destination "/vol"}}'
                                        '{{.Source}}{{end}}{{end}}')
    assert volume.startswith("/"), f"the app's container has no volume at /vol: {volume!r}"
    running = [app]

    def start(name: str) -> Started:
        token = secrets.token_hex(4)
        script = shlex.quote(_writer(f"/vol/{sub}", name, token, ack=""))
        host_os.check(f"( balena-engine exec {running[0][SERVICE]} sh -c {script} ) "
                      "</dev/null >/dev/console 2>&1 &")
        return token, f"{volume}/{sub}/{name}", "the app's writer"

    def after_boot() -> None:  # the engine starts the app again
        running[0] = apps.api.wait_running(APP_NAME, [SERVICE])

    print(_cut_while_writing(dut, host_os, pytestconfig, start, after_boot))


# --- the filesystems at boot ---------------------------------------------------------------------

FILESYSTEMS = ("resin-rootA", "resin-rootB", "resin-state", "resin-data")
# label|device|state|last checked, per filesystem (tune2fs reads the superblock)
_FS_STATUS = (
    f"for l in {' '.join(FILESYSTEMS)}; do d=$(readlink -f /dev/disk/by-label/$l); "
    "s=$(tune2fs -l $d 2>&1); printf '%s|%s|%s|%s\\n' $l $d "
    "\"$(echo \"$s\" | sed -n 's/^Filesystem state: *//p')\" "
    "\"$(echo \"$s\" | sed -n 's/^Last checked: *//p')\"; done")
# Mark each filesystem as having errors. One mounted read-write gets it from the kernel
# (ext4's trigger_fs_error, as when the kernel finds an error): a flag tune2fs wrote under a
# mounted filesystem would be overwritten by the kernel's own superblock at unmount.
_MARK = (
    f"for l in {' '.join(FILESYSTEMS)}; do d=$(readlink -f /dev/disk/by-label/$l); "
    "if grep -q \"^$d [^ ]* ext4 rw\" /proc/mounts; then "
    "echo 'marked for a check at boot' > /sys/fs/ext4/${d##*/}/trigger_fs_error || exit 1; "
    "else tune2fs -E force_fsck $d >/dev/null || exit 1; fi; done")


def _fs_status(host_os: HostOS) -> dict[str, tuple[str, str]]:
    rows = [line.split("|") for line in host_os.check(_FS_STATUS).splitlines()
            if line.count("|") == 3]
    return {label: (state, checked) for label, _dev, state, checked in rows}


def test_filesystems_marked_with_errors_are_checked_at_the_next_boot(
        dut: Dut, host_os: HostOS) -> None:
    before = _fs_status(host_os)
    assert sorted(before) == sorted(FILESYSTEMS), f"tune2fs could not read them all: {before}"
    host_os.check(_MARK)
    marked = _fs_status(host_os)
    assert all("error" in state for state, _ in marked.values()), (
        f"each filesystem should now be marked as having errors: {marked}")
    dut.reboot()
    after = _fs_status(host_os)
    unchecked = {label: {"before": before[label], "after": after.get(label)}
                 for label in FILESYSTEMS
                 if after.get(label, ("", ""))[0] != "clean"
                 or after[label][1] == before[label][1]}
    assert not unchecked, (
        "filesystems marked as having errors must be checked (e2fsck) at the next boot: "
        f"these are not clean, or their last check did not change: {unchecked}")


RESETS = {"resin-state": ("/mnt/state/remove_me_to_reset", "/mnt/state/root-overlay/reset-check"),
          "resin-data": ("/mnt/data/remove_me_to_reset", "/mnt/data/resin-data/reset-check")}


# balenaOS's disk watchdog (their os/tests/disk-watchdog): its units, its state and the test's
# drop-in, which points the daemon at a file on a disk the test can make fail
DWD_DIR = "/mnt/state/disk-watchdog"
DWD_UNITS = "disk-watchdog-boot-history disk-watchdogd"
DWD_DROPIN = "/run/systemd/system/disk-watchdogd.service.d/override.conf"
DWD_MOUNT = "/mnt/state/io-error-mount"
DWD_DM = "hil-disk-watchdog"
DWD_IMAGE = "/tmp/hil-disk-watchdog.img"
DWD_REBOOT_WITHIN = 120.0  # theirs: the device reboots within 120 s of its disk failing
# dmsetup in a privileged container (balenaOS has no dmsetup on the host); no udev there
DMSETUP = "DM_DISABLE_UDEV=1 dmsetup --noudevsync"


def _dm_device(host_os: HostOS) -> str:
    """The /dev node of the test's device-mapper device, found by its name in sysfs."""
    return host_os.check(f"for d in /sys/block/dm-*; do [ \"$(cat $d/dm/name)\" = {DWD_DM} ] "
                         "&& echo /dev/${d##*/}; done; true").strip()


def _disk_watchdog_state(host_os: HostOS) -> tuple[str, int, bool]:
    """(disk-watchdogd's ActiveState, lines in its boot history, whether it is disabled)."""
    out = host_os.check(f"systemctl show -p ActiveState --value disk-watchdogd; "
                        f"grep -c . {DWD_DIR}/boot-history 2>/dev/null; "
                        f"test -e {DWD_DIR}/disabled && echo disabled; true").split()
    return out[0], int(out[1]) if len(out) > 1 and out[1].isdigit() else 0, "disabled" in out


def _restart_disk_watchdog(host_os: HostOS, history: str = "") -> None:
    """A clean slate as theirs makes it: the boot history set to ``history`` (timestamps, one
    a line), the units restarted (the history updater adds this "boot"). The unit's start limit
    (three starts in two minutes, then a forced reboot) is reset first: it is there for a
    daemon that keeps failing, and the test's own restarts, a few seconds after the boot's
    start, must not count against it."""
    host_os.check(f"mkdir -p {DWD_DIR} && printf '%s' {shlex.quote(history)} > "
                  f"{DWD_DIR}/boot-history && systemctl reset-failed {DWD_UNITS}; "
                  f"systemctl restart {DWD_UNITS} || true")


def test_disk_watchdog_reboots_a_device_whose_disk_fails_and_disables_itself(
        dut: Dut, host_os: HostOS, dmsetup_image: str) -> None:
    """balenaOS's disk watchdog: enabled and active, one boot in its history; when the disk
    under its test file returns I/O errors (a device-mapper device switched to the error
    target), the device reboots within 120 s and the history holds two boots; with three boots
    in ten minutes it disables itself (the disabled file) and stays stopped, even restarted."""
    host_os.check(f"rm -f {DWD_DIR}/disabled")
    _restart_disk_watchdog(host_os)
    enabled = host_os.run("systemctl is-enabled disk-watchdogd").stdout.strip()
    assert enabled == "enabled", f"disk-watchdogd should be enabled; it is {enabled!r}"
    state = _disk_watchdog_state(host_os)
    assert state == ("active", 1, False), (
        f"after a restart disk-watchdogd should be active with one boot in its history; "
        f"(ActiveState, boots, disabled) = {state}\n{host_os.unit_log('disk-watchdogd')[-1500:]}")
    boot = dut.boot_id()
    sent = rebooted = False
    loop = ""
    try:
        # a 4 MiB ext4 on a loop device, under a linear device-mapper device; the test file on it
        loop = host_os.check(f"dd if=/dev/zero of={DWD_IMAGE} bs=1M count=4 2>/dev/null && "
                             f"l=$(losetup -f) && losetup $l {DWD_IMAGE} && "
                             "mkfs.ext4 -q $l && echo $l").split()[-1]
        image = shlex.quote(dmsetup_image)
        host_os.check(f"balena-engine run --rm --privileged {image} sh -c "
                      + shlex.quote(f'{DMSETUP} create {DWD_DM} --table '
                                    f'"0 $(blockdev --getsz {loop}) linear {loop} 0"'),
                      timeout=180)
        dev = _dm_device(host_os)
        assert dev, f"the device-mapper device {DWD_DM} has no node under /sys/block"
        # theirs: the daemon on the test file, with a 2 s watchdog (a runtime drop-in)
        dropin = ("[Service]\nExecStart=\nExecStart=/bin/sh -c '/usr/bin/disk-watchdogd -v "
                  f"-f {DWD_MOUNT}/test.bin -b 512'\nWatchdogSec=\nWatchdogSec=2\n")
        host_os.check(f"mkdir -p {DWD_MOUNT} $(dirname {DWD_DROPIN}) && mount {dev} {DWD_MOUNT} "
                      f"&& dd if=/dev/urandom of={DWD_MOUNT}/test.bin bs=64k count=4 "
                      "2>/dev/null && sync && printf "
                      + shlex.quote(dropin.replace("%", "%%").replace("\n", "\\n"))
                      + f" > {DWD_DROPIN} && systemctl daemon-reload && "
                      "{ systemctl reset-failed disk-watchdogd; "
                      "systemctl restart disk-watchdogd; }")
        active = host_os.unit_property("disk-watchdogd", "ActiveState")
        assert active == "active", (
            f"disk-watchdogd on the test's file should be active; it is {active!r}\n"
            f"{host_os.unit_log('disk-watchdogd')[-1500:]}")
        # every read of the device fails from now on; the marker is printed, not typed
        error = (f"balena-engine run --rm --privileged {image} sh -c "
                 + shlex.quote(f"{DMSETUP} suspend {DWD_DM} && echo \"0 $(blockdev --getsz "
                               f"{loop}) error\" | {DMSETUP} reload {DWD_DM} && "
                               f"{DMSETUP} resume {DWD_DM} && echo HIL-DWD-$((6*7))"))
        at = dut.start_reboot(error)
        sent = True
        dut.rig.log.wait_for(re.compile(rb"HIL-DWD-42"), at, 180,
                             f"the container to switch {DWD_DM} to the error target")
        try:
            dut.await_boot(at, DWD_REBOOT_WITHIN)
        except DeadlineError as exc:
            try:  # the console's shell was given up for the reboot; SSH still reaches it
                seen = host_os.via_ssh().unit_log("disk-watchdogd")[-1500:]
            except HilError as why:
                seen = f"(its log could not be read: {why})"
            raise AssertionError(
                f"the disk under disk-watchdogd's test file fails every read, yet the device "
                f"did not reboot within {DWD_REBOOT_WITHIN:.0f} s: {exc}\ndisk-watchdogd's "
                f"log:\n{seen}") from None
        rebooted = True
        dut.wait_ready()
        assert dut.boot_id() != boot
        state = _disk_watchdog_state(host_os)
        assert state[1] == 2, (
            f"after the disk watchdog's reboot its history should hold two boots; "
            f"(ActiveState, boots, disabled) = {state}")
        # three boots within ten minutes: the updater disables the watchdog, which stays off
        now = int(host_os.check("date +%s"))
        _restart_disk_watchdog(host_os, f"{now}\n{now - 60}\n{now - 120}\n")
        state = _disk_watchdog_state(host_os)
        assert state[0] != "active" and state[2], (
            f"with three boots in ten minutes in its history disk-watchdogd should be disabled "
            f"and stopped; (ActiveState, boots, disabled) = {state}")
        _restart_disk_watchdog(host_os)
        state = _disk_watchdog_state(host_os)
        assert state[0] != "active", (
            f"disabled, disk-watchdogd must not start again; (ActiveState, boots, disabled) = "
            f"{state}")
    except BaseException:
        # what the test set up is undone as far as it can be; a failure doing so must not hide
        # the test's own
        with contextlib.suppress(HilError):
            _undo_disk_watchdog_test(dut, host_os, dmsetup_image, loop, sent, rebooted)
        raise
    _undo_disk_watchdog_test(dut, host_os, dmsetup_image, loop, sent, rebooted)


def _undo_disk_watchdog_test(dut: Dut, host_os: HostOS, image: str, loop: str, sent: bool,
                             rebooted: bool) -> None:
    """The watchdog back as it ships (enabled, a fresh history); where no reboot cleared them,
    the drop-in, the mount, the device-mapper device and the loop device taken down."""
    if not rebooted:
        if sent:  # the shell was given up for a reboot that never came: take it up again
            dut.wait_ready()
        host_os.run(f"rm -f {DWD_DROPIN}; systemctl daemon-reload; umount {DWD_MOUNT}; "
                    f"balena-engine run --rm --privileged {shlex.quote(image)} sh -c "
                    f"{shlex.quote(f'{DMSETUP} remove {DWD_DM}')}; "
                    f"{f'losetup -d {loop}; ' if loop else ''}rm -f {DWD_IMAGE}", timeout=180)
    host_os.run(f"rmdir {DWD_MOUNT} 2>/dev/null; rm -f {DWD_DIR}/disabled")
    _restart_disk_watchdog(host_os)


def test_removing_the_reset_flags_purges_state_and_data(dut: Dut, host_os: HostOS) -> None:
    """balenaOS's purge: a partition whose ``remove_me_to_reset`` is gone is reset at the next
    boot (state: its root-overlay; data: the apps' data and the engine's), the flag comes back,
    and the engine and the supervisor are healthy again on the emptied data partition. Last in
    the suite: it wipes what the tests before it wrote."""
    host_os.check(" && ".join(f"mkdir -p $(dirname {check}) && echo x > {check} && sync && "
                              f"rm {flag} && sync" for flag, check in RESETS.values()))
    dut.reboot()
    out = host_os.check("; ".join(
        f"[ -e {check} ] && echo KEPT={label}; [ -e {flag} ] || echo NOFLAG={label}"
        for label, (flag, check) in RESETS.items()) + "; true")
    kept = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("KEPT=")]
    noflag = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("NOFLAG=")]
    assert not kept, (f"{kept}: the reset flag was removed, yet the next boot kept what the "
                      "partition held")
    assert not noflag, f"{noflag}: the reset flag was not put back after the reset"
    if host_os.has_engine():
        host_os.wait_engine()
        r = host_os.run("/usr/lib/balena/balena-healthcheck", timeout=300)
        assert r.ok, (f"after the data reset balena-healthcheck fails (exit {r.exit_code}):\n"
                      f"{r.stdout[-2000:]}")
        host_os.supervisor().wait_healthy()
