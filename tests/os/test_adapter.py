"""The adapter turns what the device prints into the contract's terms: a fake device answers
its commands with what balenaOS / the reference OS print (no board needed)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hil.console.shell import Result
from hil.os import BalenaOS, BootState, OSContractError, RootPart, Secret
from hil.os.balena import CONFIG_JSON, REGISTER_WAIT, config_json_edit, registration_wait


class FakeDut:
    """Answers by the first key that occurs in the command."""

    def __init__(self, answers: dict[str, str | Callable[[str], str]],
                 bootloader: str = "uboot") -> None:
        self.answers = answers
        self.commands: list[str] = []
        dtype = SimpleNamespace(bootloader=bootloader)
        self.rig = SimpleNamespace(config=SimpleNamespace(device_type=dtype), network=None,
                                   name="fake", log=SimpleNamespace(end=0))
        self.timeouts = SimpleNamespace(command=5.0, boot=60.0)
        self.ssh = SimpleNamespace(available=False)  # the rig has no network: all on the console

    def run(self, command: str, timeout: float | None = None) -> Result:
        self.commands.append(command)
        for key, answer in self.answers.items():
            if key in command:
                out = answer(command) if callable(answer) else answer
                return Result(command, out, None, 0, 0.01)
        raise AssertionError(f"unexpected command {command!r}")


def adapter(answers: dict[str, Any], bootloader: str = "uboot") -> BalenaOS:
    return BalenaOS(FakeDut(answers, bootloader))  # type: ignore[arg-type]


ROOTS_B_ACTIVE = ("active /dev/mmcblk0p3\ninactive /dev/mmcblk0p2\n"
                  "label resin-boot /dev/mmcblk0p1\nlabel resin-rootA /dev/mmcblk0p2\n"
                  "label resin-rootB /dev/mmcblk0p3\nlabel resin-state /dev/mmcblk0p5\n"
                  "label resin-data /dev/mmcblk0p6\nmounted /dev/mmcblk0p3\n")


def test_roots_from_by_state_links_and_labels() -> None:
    roots = adapter({"by-state": ROOTS_B_ACTIVE}).roots()
    assert roots.active == RootPart("resin-rootB", "/dev/mmcblk0p3", 3)
    assert roots.inactive == RootPart("resin-rootA", "/dev/mmcblk0p2", 2)
    assert roots.mounted_active == "/dev/mmcblk0p3"
    assert roots.by_number(2) == roots.inactive


def test_roots_without_by_state_links_use_the_mount() -> None:
    text = ("active \ninactive \nlabel resin-rootA /dev/sda2\nlabel resin-rootB /dev/sda3\n"
            "mounted /dev/sda2\n")
    roots = adapter({"by-state": text}).roots()
    assert (roots.active.device, roots.inactive.device) == ("/dev/sda2", "/dev/sda3")
    with pytest.raises(OSContractError, match="neither"):
        adapter({"by-state": "active \ninactive \nmounted \n"}).roots()


def test_uboot_state_merges_both_files() -> None:
    files = ("==> resinOS_uEnv.txt\nresin_root_part=3\nupgrade_available=1\n\n"
             "==> bootcount.env\nbootcount=2\n\n")
    assert adapter({"==>": files}).boot_state() == BootState(3, 1, 2)


def test_grub_state_and_missing_environment() -> None:
    files = ("==> grub/grubenv\n# GRUB Environment Block\nresin_root_part=3\n"
             "upgrade_available=0\nbootcount=0\n" + "#" * 900 + "\n\n")
    assert adapter({"==>": files}, "grub").boot_state() == BootState(3, 0, 0)
    # a U-Boot file on a GRUB device is not what GRUB reads
    with pytest.raises(OSContractError, match="no grub environment"):
        adapter({"==>": "==> resinOS_uEnv.txt\nresin_root_part=2\n\n"}, "grub").boot_state()


def test_markers_only_known_names() -> None:
    os_ = adapter({"rollback-health-breadcrumb": "rollback-health-breadcrumb\n"
                                                 "rollback-altboot-triggered\nnoise\n"})
    assert os_.rollback_markers() == {"rollback-health-breadcrumb", "rollback-altboot-triggered"}


def test_config_json_over_the_console_hashes_secrets_on_the_device() -> None:
    key = "0f" * 16
    answer = (json.dumps({"uuid": "abc", "os": {"sshKeys": []}}) + "\n-\n"
              + hashlib.sha256(key.encode()).hexdigest() + "\n-\n")
    fake = FakeDut({"jq -r": answer})
    cfg = BalenaOS(fake).config_json()  # type: ignore[arg-type]
    assert cfg["uuid"] == "abc" and "apiKey" not in cfg
    assert isinstance(cfg["deviceApiKey"], Secret) and cfg["deviceApiKey"].matches(key)
    assert key not in " ".join(fake.commands)  # the command never carries a key either


def test_set_config_is_atomic_and_refuses_secrets() -> None:
    fake = FakeDut({"jq": ""})
    os_ = BalenaOS(fake)  # type: ignore[arg-type]
    os_.set_config(hostname="x", **{"os.sshKeys": ["k"]}, ntpServers=None)
    cmd = fake.commands[-1]
    assert 'setpath(["hostname"]; $v0)' in cmd and 'setpath(["os", "sshKeys"]; $v1)' in cmd
    assert 'delpaths([["ntpServers"]])' in cmd
    assert "config.json.hil-new" in cmd and "mv -f" in cmd and "sync" in cmd
    assert cmd.startswith(registration_wait(CONFIG_JSON, REGISTER_WAIT) + " && ")
    with pytest.raises(ValueError, match="secret"):
        os_.set_config(deviceApiKey="nope")


def _registration_wait(path: Path, seconds: int) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run(["sh", "-c", registration_wait(str(path), seconds)],
                       capture_output=True, text=True, timeout=seconds + 30)
    return r.returncode, r.stdout, time.monotonic() - t0


def test_an_edit_of_config_json_waits_for_the_devices_registration(tmp_path: Path) -> None:
    """The shell set_config runs first, against a config.json as balena's supervisor (compact)
    and jq (spaced) write it: no wait for an unmanaged or registered device; a wait that ends
    when registered_at is written; a failure naming what it waited for after its deadline."""
    cfg = tmp_path / "config.json"
    for done in ('{"uuid":"a"}', '{"apiEndpoint": ""}',
                 '{"apiEndpoint":"https://api","registered_at":1}'):
        cfg.write_text(done)
        assert _registration_wait(cfg, 5)[0] == 0, done
    cfg.write_text('{"apiEndpoint": "http://10.0.2.2:1", "uuid": "a"}')
    timer = threading.Timer(1.0, lambda: cfg.write_text(
        '{"apiEndpoint": "http://10.0.2.2:1", "uuid": "a", "registered_at": 1}'))
    timer.start()
    code, _, took = _registration_wait(cfg, 10)
    timer.join()
    assert code == 0 and 1.0 <= took < 9, (code, took)
    cfg.write_text('{"apiEndpoint":"https://api","deviceApiKey":"k"}')
    code, out, took = _registration_wait(cfg, 1)
    assert code != 0 and took >= 1.0
    assert "expected the device to finish registering (registered_at) within 1 s" in out


def test_an_edit_of_config_json_another_write_overtook_is_made_again(tmp_path: Path) -> None:
    """The edit set_config runs, against a file: alone, one round; when another program (the
    supervisor) writes the file after it, from what it read before (so the edit is lost), the
    edit is made again on what is there now, and both changes are kept."""
    cfg, count = tmp_path / "config.json", tmp_path / "settles"

    def edit(overtaken_at: int) -> subprocess.CompletedProcess[str]:
        # the OS's settle step, which also plays the other writer once, at settle number N
        settle = (f"c=$(($(cat {count} 2>/dev/null || echo 0) + 1)); echo $c > {count}; "
                  f"if [ $c = {overtaken_at} ]; then printf '%s' '{{\"uuid\": \"a\", "
                  f"\"os\": {{\"kernel\": {{\"extraFirmwareVol\": \"x\"}}}}}}' > {cfg}; "
                  "fi; true")
        count.unlink(missing_ok=True)
        cfg.write_text('{"uuid": "a"}')
        return subprocess.run(
            ["sh", "-c", config_json_edit(str(cfg), "--argjson v0 '\"h\"'",
                                          'setpath(["hostname"]; $v0)', settle)],
            capture_output=True, text=True, timeout=60)

    r = edit(overtaken_at=0)
    assert r.returncode == 0 and "edited again" not in r.stdout, r
    assert json.loads(cfg.read_text()) == {"uuid": "a", "hostname": "h"}
    assert count.read_text().strip() == "2"  # one settle before the write, one after
    r = edit(overtaken_at=2)  # written over right after the edit
    assert r.returncode == 0 and "another write came in between: edited again" in r.stdout, r
    assert json.loads(cfg.read_text()) == {"uuid": "a", "hostname": "h",
                                           "os": {"kernel": {"extraFirmwareVol": "x"}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "settles"]
    cfg.write_text("not json")
    r = subprocess.run(["sh", "-c", config_json_edit(str(cfg), "", ".", "true")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and cfg.read_text() == "not json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "settles"]


def test_listening_ports_and_data_dir() -> None:
    tcp = ("  sl  local_address rem_address   st\n"
           "   0: 00000000:56CE 00000000:0000 0A 0\n"
           "   1: 0F02000A:56CE 0202000A:D082 01 0\n")
    assert adapter({"/proc/net/tcp": tcp}).listening_tcp_ports() == {22222}
    mounts = "/dev/vda5 /mnt/data ext4 rw\n/dev/vda5[/resin-data] /data ext4 rw\n"
    assert adapter({"findmnt": mounts}).data_dir == "/data"
    assert adapter({"findmnt": "/dev/sda6 /mnt/data ext4 rw\n"}).data_dir == \
        "/mnt/data/resin-data"


class EngineDut(FakeDut):
    """A device whose engine holds ``held`` (image IDs by reference) and answers ``info``."""

    def __init__(self, held: dict[str, str]) -> None:
        def inspect(command: str) -> str:
            return next((i for ref, i in held.items() if ref in command), "")

        super().__init__({"image inspect": inspect, "info": "24.0.5", "pull": "pulled"})
        self.boots = 1

    def poll(self, probe: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        return probe()  # the engine answers at the first look


def test_an_app_image_held_is_asked_for_once_per_boot() -> None:
    ref, image_id = "reg/hil/busybox:1", "sha256:" + "a" * 64
    image = SimpleNamespace(id=image_id, tag="hil/busybox:1")
    dut = EngineDut({ref: image_id})
    host_os = BalenaOS(dut)  # type: ignore[arg-type]
    assert host_os.pull_image(ref, image) == ref  # type: ignore[arg-type]
    assert host_os.via_ssh()._holds(ref, image)  # type: ignore[arg-type]  # the twin knows
    assert host_os.pull_image(ref, image) == ref  # type: ignore[arg-type]
    assert [c for c in dut.commands if "balena-engine" in c] == [
        f"balena-engine image inspect --format '{{{{.Id}}}}' {ref} 2>/dev/null"]
    dut.boots += 1  # a new boot: asked again (a data reset may have emptied the engine)
    host_os.pull_image(ref, image)  # type: ignore[arg-type]
    assert sum("image inspect" in c for c in dut.commands) == 2
    assert not any("pull" in c or "info" in c for c in dut.commands)


def test_an_app_image_missing_is_pulled_once_the_engine_answers() -> None:
    ref, image_id = "reg/hil/busybox:1", "sha256:" + "b" * 64
    held: dict[str, str] = {}
    dut = EngineDut(held)
    dut.answers["pull"] = lambda command: held.update({ref: image_id}) or "pulled"
    host_os = BalenaOS(dut)  # type: ignore[arg-type]
    host_os.pull_image(ref, SimpleNamespace(id=image_id, tag="t"))  # type: ignore[arg-type]
    engine = [m.group(1) for c in dut.commands if (m := re.search(r"balena-engine (\w+)", c))]
    assert engine == ["image", "info", "pull", "image"], dut.commands
