"""First boot of the reference OS in QEMU: the OS contract a suite relies on."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from refos_guest import Guest, Images, SshKey, ssh_ok, ssh_run

from hil.deadline import wait_until
from hil.refos import RegistrationServer, configure

pytestmark = pytest.mark.qemu

GuestFactory = Callable[..., Guest]


def test_first_boot_dev_mode(arch: str, images: Images, disk: Path, api: RegistrationServer,
                             guest_factory: GuestFactory, keys: tuple[SshKey, SshKey],
                             record_property: Callable[[str, object], None]) -> None:
    uuid = secrets.token_hex(16)
    configure(disk, {"uuid": uuid, "developmentMode": True, "apiEndpoint": api.url_for_guest,
                     "apiKey": api.api_key, "os": {"sshKeys": [keys[0].public]},
                     "ntpServers": "10.0.2.2"})
    g = guest_factory(disk)
    g.start()
    boot = g.wait_boot()
    assert (boot.root, boot.bootcount, boot.upgrade_available) == (2, 0, 0)
    version, host = g.wait_ready()
    g.wait_prompt()
    shell_s = time.monotonic() - g.started
    record_property("boot_to_shell_s", round(shell_s, 2))
    print(f"{arch}: QEMU start -> root shell {shell_s:.1f}s")
    assert (version, host) == ("1.0.0", uuid[:7])

    # hostname, os-release, partitions and mounts of the contract
    assert g.run("cat /etc/hostname; hostname").split() == [uuid[:7]] * 2
    assert 'VERSION="1.0.0"' in g.run("cat /etc/os-release")
    assert g.run("uname -m") == arch
    # norandmaps (docs/refos.md): programs map at fixed addresses, so QEMU reuses its
    # translations of the engine's binaries from one run to the next
    assert g.run("cat /proc/sys/kernel/randomize_va_space") == "0"
    labels = g.run("ls /dev/disk/by-label").split()
    assert sorted(labels) == ["resin-boot", "resin-data", "resin-rootA", "resin-rootB",
                              "resin-state"]
    assert g.run("readlink -f /dev/disk/by-state/active") == "/dev/vda2"
    assert g.run("readlink -f /dev/disk/by-state/inactive") == "/dev/vda3"
    assert g.run("findmnt -no SOURCE /mnt/sysroot/active") == "/dev/vda2"
    mounts = g.run("cat /proc/mounts")
    for point in ("/mnt/boot", "/mnt/state", "/mnt/data", "/mnt/sysroot/active",
                  "/mnt/sysroot/inactive", "/data"):
        assert f" {point} " in mounts, point
    assert g.run("awk '$2 == \"/\" {print $4}' /proc/mounts").startswith("ro")
    assert g.exists("/mnt/data/remove_me_to_reset")
    for node in ("/dev/rtc0", "/dev/watchdog", "/dev/gpiochip0"):
        if arch == "x86_64" and node == "/dev/gpiochip0":
            continue  # no GPIO controller on the PC machine
        assert g.exists(node), node
    assert g.run("cat /mnt/boot/config.json | jq -r .deviceType") == images.v1.device_type

    # registration reached the endpoint with our uuid and the provisioning key
    reg = api.wait_for(uuid, timeout=60)
    assert reg.auth_ok and reg.device_type == images.v1.device_type
    assert reg.device_api_key is not None
    want = hashlib.sha256(reg.device_api_key.encode()).hexdigest()
    wait_until(lambda: g.run("jq -j '.deviceApiKey // empty' /mnt/boot/config.json"
                             " | sha256sum | cut -d' ' -f1") == want,
               30, "deviceApiKey stored in config.json", interval=0.5)
    wait_until(lambda: g.run("jq -r '.registered_at // empty' /mnt/boot/config.json") != "",
               30, "registered_at stored in config.json", interval=0.5)

    # os-config fetched its service configuration with the device key, and installed the
    # cloud account's key it holds as root's authorized_keys_remote
    wait_until(lambda: uuid in api.config_fetches, 60, "os-config's GET /os/v1/config",
               interval=0.5)
    wait_until(lambda: "Service configuration retrieved" in g.run(
        "journalctl -u os-config --no-pager -o cat"), 30, "os-config's log", interval=0.5)
    cloud = f"{api.cloud_key.get_name()} {api.cloud_key.get_base64()}"
    wait_until(lambda: cloud in g.run("cat /home/root/.ssh/authorized_keys_remote 2>/dev/null;"
                                      " true"), 30,
               "the cloud key installed", interval=0.5)

    # chrony is the NTP client and carries the configured server
    assert "10.0.2.2" in g.run("chronyc -n sources")
    assert "Reference ID" in g.run("chronyc tracking")

    # SSH on 22222: key login, and passwordless root in development mode
    assert ssh_run(g.ssh_port, "cat /etc/hostname", keys[0]) == (0, uuid[:7])
    assert ssh_ok(g.ssh_port, None)

    # no key ever reaches the console
    log = g.tail(10**7)
    assert api.api_key not in log and reg.device_api_key not in log

    # identity survives a reboot; registration is not repeated
    g.reboot()
    g.wait_boot()
    assert g.wait_ready() == ("1.0.0", uuid[:7])
    g.wait_prompt()
    assert len([r for r in api.registrations if r.uuid == uuid]) == 1
    assert json.loads(g.run("jq -c '{uuid}' /mnt/boot/config.json")) == {"uuid": uuid}


def test_production_mode_ssh_keys_and_runtime_config(
        arch: str, disk: Path, guest_factory: GuestFactory, keys: tuple[SshKey, SshKey]
) -> None:
    key1, key2 = keys
    configure(disk, {"uuid": secrets.token_hex(16), "hostname": "hil-prod",
                     "developmentMode": False, "os": {"sshKeys": [key1.public]}})
    g = guest_factory(disk)
    g.start()
    g.wait_boot()
    assert g.wait_ready()[1] == "hil-prod"
    g.expect(r"login: ", 30)  # production: a login prompt, not a shell

    port = g.ssh_port
    assert ssh_run(port, "cat /etc/hostname", key1) == (0, "hil-prod")
    assert not ssh_ok(port, None), "production must refuse passwordless root"
    assert not ssh_ok(port, key2)

    # change config.json at runtime (as a supervisor would): keys and hostname re-applied
    cmd = ("cd /mnt/boot && jq '.os.sshKeys=[\"" + key2.public + "\"] | "
           ".hostname=\"hil-renamed\"' config.json > c.tmp && mv c.tmp config.json && sync")
    assert ssh_run(port, cmd, key1)[0] == 0
    wait_until(lambda: ssh_ok(port, key2), 30, "login with the new key")
    assert not ssh_ok(port, key1)
    assert ssh_run(port, "cat /etc/hostname; hostname", key2) == (0, "hil-renamed\nhil-renamed")


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
                          None, stdin=api.api_key)
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
