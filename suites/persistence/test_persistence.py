"""/data persistence: what an app writes and syncs to /data is still there, byte for byte, after
a soft reboot, a hard power cut, a host OS update and a rollback; and under power cuts at random
moments every write the device acknowledged (fsync returned) survives on a clean filesystem.
"""

from __future__ import annotations

import random
import re
import secrets
import time

import pytest

from hil.dut import Dut
from hil.os import HostOS, UpdateImage, parse
from hil.os.flows import boot_broken_health, boot_good, install

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


def test_file_survives_a_soft_reboot(dut: Dut, host_os: HostOS) -> None:
    host_os.put_checked_file("soft-reboot")
    dut.reboot()
    _promise_kept(host_os, "soft-reboot", "a soft reboot")


def test_file_survives_a_power_cut(dut: Dut, host_os: HostOS) -> None:
    host_os.put_checked_file("power-cut")
    dut.power_cycle()
    _promise_kept(host_os, "power-cut", "a hard power cut")


def test_file_survives_a_host_os_update(dut: Dut, host_os: HostOS,
                                        update_image: UpdateImage) -> None:
    host_os.put_checked_file("update")
    inst = install(host_os, update_image)
    boot_good(dut, host_os, inst)
    _promise_kept(host_os, "update", f"a host OS update {inst.old_version} -> "
                  f"{update_image.version or update_image.describe()}")


def test_file_survives_a_rollback(dut: Dut, host_os: HostOS, update_image: UpdateImage) -> None:
    """The unhealthy update boots with /data mounted, then the health check rolls it back."""
    host_os.put_checked_file("rollback")
    inst = install(host_os, update_image)
    boot_broken_health(dut, host_os, inst, count=1, timeout=1)
    _promise_kept(host_os, "rollback", f"an update to {update_image.describe()}, unhealthy, "
                  "and its rollback")


# --- power-cut fault injection ---------------------------------------------------------------

def _writer(directory: str, name: str, token: str) -> str:
    """Append record 1, 2, ... to ``name``; fsync each; then print its number to the console
    (the acknowledgement). The file's creation is made durable (fsync of the directory) first."""
    pad = parse.record(1)[9:-1].decode()
    return (f"mkdir -p {directory} && cd {directory} && : > {name} && sync {name} . && i=0 && "
            f"while :; do i=$((i+1)); printf '%08d %s\\n' $i '{pad}' >> {name} || exit 1; "
            f"sync {name} || exit 1; echo \"HIL-ACK {token} $i\" > /dev/console; done")


def _read(dut: Dut, host_os: HostOS, path: str) -> bytes:
    """The file's bytes; empty if it is gone (then every acknowledged record is lost). Over
    SSH where the rig has a network: no console message can cut into it."""
    reader = host_os.via_ssh() if dut.ssh.available else host_os
    # records are ASCII; anything else shows as U+FFFD
    return reader.check(f"if [ -e {path} ]; then cat {path}; fi", 120, read_only=True).encode()


def test_acknowledged_writes_survive_random_power_cuts(dut: Dut, host_os: HostOS,
                                                        pytestconfig: pytest.Config) -> None:
    cuts = int(pytestconfig.getoption("--power-cuts"))
    seed = int(pytestconfig.getoption("--power-cut-seed"))
    if cuts <= 0:
        pytest.skip("--power-cuts 0")
    rng = random.Random(seed)
    disk = dut.disk
    directory = f"{host_os.data_dir}/hil-power-cuts-{secrets.token_hex(3)}"
    data_dev = host_os.labels().get("resin-data", "resin-data")
    online_fsck = host_os.has_tools("e2fsck", "fsfreeze")
    acked: dict[str, int] = {}
    fs_checked: list[str] = []
    for cycle in range(1, cuts + 1):
        where = f"cut {cycle}/{cuts} (--power-cut-seed {seed})"
        name, token = f"records-{cycle}", secrets.token_hex(4)
        at = dut.rig.log.end
        host_os.check(f"( {_writer(directory, name, token)} ) </dev/null >/dev/null 2>&1 &")
        wanted = rng.randint(1, 40)
        dut.rig.log.wait_for(re.compile(rf"HIL-ACK {token} {wanted}\b".encode()), at,
                             ACK_TIMEOUT, f"the writer to acknowledge record {wanted}")
        # Deliberate: a random moment inside the append/fsync/print cycle (~15 ms on QEMU).
        time.sleep(rng.uniform(0.0, 0.02))
        dut.power_off()
        acked[name] = parse.acknowledged(dut.rig.log.read(at), token)
        if disk is not None:
            check = disk.fsck("resin-data")
            assert check.clean, (f"after {where} the data partition is not clean "
                                 f"(e2fsck, journal replayed):\n{check.summary()}")
            fs_checked.append("rig-side e2fsck after each cut")
        dut.power_on()  # after the rig's off-time
        for fname, n in acked.items():
            got = parse.check_records(_read(dut, host_os, f"{directory}/{fname}"))
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
    host_os.check(f"rm -rf {directory}")
    if not fs_checked:
        pytest.skip(f"all acknowledged records survived {cuts} power cuts, but the filesystem "
                    "could not be checked: the rig's disk is not a file and the OS has no "
                    "e2fsck + fsfreeze")
