"""First boot of the reference OS in QEMU, below the framework: registration against an
endpoint that is down or refuses the key, and one the device did not store. The rest of the
OS contract (hostname, partitions, mounts, SSH, os-config, chrony, identity across boots,
production mode) is what the suites check on both QEMU boards in the same `make test`."""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from refos_guest import Guest, ssh_run

from hil.deadline import wait_until
from hil.refos import RegistrationServer, configure

# the registration is the OS's shell, the same on both arches: one board is enough (the suites
# boot both in the same `make test`)
pytestmark = [pytest.mark.qemu, pytest.mark.parametrize("arch", ["aarch64"], indirect=True)]

GuestFactory = Callable[..., Guest]


def test_registration_retries_until_accepted(disk: Path, guest_factory: GuestFactory) -> None:
    """The endpoint is down at first boot, then refuses a wrong provisioning key: the device
    keeps retrying, stores nothing, and registers once config.json has the right key."""
    from refos_guest import free_port

    port = free_port()  # nothing listens there until the server starts below
    uuid = secrets.token_hex(16)
    configure(disk, {"uuid": uuid, "developmentMode": True, "persistentLogging": True,
                     "apiEndpoint": f"http://10.0.2.2:{port}", "apiKey": "wrong-key"})
    g = guest_factory(disk)
    g.start()
    g.wait_ready()
    g.wait_prompt()
    # norandmaps (docs/refos.md): programs map at fixed addresses, so QEMU reuses its
    # translations of the engine's binaries from one run to the next
    assert g.run("cat /proc/sys/kernel/randomize_va_space") == "0"
    # kpti=0 (docs/refos.md): no page-table switch per system call, each of which empties
    # QEMU's TLB
    assert "isolation forced OFF" in g.run("dmesg | grep -i 'page table isolation'")
    # persistentLogging: journald writes its journal to resin-state (this machine's, whose id
    # is kept there too)
    journal = "/mnt/state/root-overlay/var/log/journal/$(cat /etc/machine-id)/system.journal"
    wait_until(lambda: g.exists(journal), 30, "the journal on resin-state", interval=0.5)
    assert g.run("cat /mnt/state/root-overlay/etc/machine-id") == g.run("cat /etc/machine-id")

    with RegistrationServer(port=port) as api:
        wait_until(lambda: len(api.registrations) >= 2, 60, "two refused attempts",
                   interval=0.2)
        assert not any(r.auth_ok for r in api.registrations)
        assert g.run("jq -r '.registered_at // \"none\"' /mnt/boot/config.json") == "none"
        # fix the key at runtime, as a user re-provisioning the device would
        # (over SSH's stdin: the key must not appear on the console)
        rc, out = ssh_run(g.ssh_port, "cd /mnt/boot && jq --rawfile k /dev/stdin "
                          "'.apiKey = $k' config.json > c.tmp && mv c.tmp config.json && sync",
                          stdin=api.api_key)
        assert rc == 0, out
        reg = api.wait_for(uuid, timeout=60)
        assert reg.device_type
        wait_until(lambda: g.run("jq -r '.registered_at // empty' /mnt/boot/config.json") != "",
                   30, "registered_at stored", interval=0.5)
    assert g.run("jq -r '.deviceApiKey | length' /mnt/boot/config.json") == "32"


def test_a_registration_the_device_did_not_store_is_settled_not_repeated(
        disk: Path, guest_factory: GuestFactory) -> None:
    """The API took the registration, but the device restarted before it stored registered_at
    (as a test that reboots early does): at the next boot the API answers 409, and the device
    asks for itself with its key, as balena's supervisor does, instead of registering again."""
    uuid, device_key = secrets.token_hex(16), secrets.token_hex(16)
    with RegistrationServer() as api:
        req = urllib.request.Request(
            api.url + "/device/register", headers={"Authorization": f"Bearer {api.api_key}"},
            data=json.dumps({"uuid": uuid, "device_type": "x", "api_key": device_key}).encode())
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 201
        configure(disk, {"uuid": uuid, "developmentMode": True, "apiKey": api.api_key,
                         "apiEndpoint": api.url_for_guest, "deviceApiKey": device_key})
        g = guest_factory(disk)
        g.start()
        g.wait_ready()
        g.wait_prompt()
        wait_until(lambda: g.run("jq -r '.registered_at // empty' /mnt/boot/config.json") != "",
                   60, "registered_at stored", interval=0.5)
        assert api.conflicts == [uuid]
        assert [r.uuid for r in api.registrations if r.auth_ok] == [uuid]
        assert g.run("jq -r .deviceId /mnt/boot/config.json") == "1"
