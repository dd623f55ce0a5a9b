"""The reference OS builder: cache, reproducibility, layout, bmap, contents (no QEMU)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from refos_guest import Images

import hil.refos.builder as build_mod
from hil.cli import main as hil_main
from hil.errors import NotReached
from hil.lock import HostLock
from hil.refos import RefosImage, RegistrationServer, boot_env, build, configure
from hil.refos.debs import elf_deps
from hil.refos.fs import cpio_newc
from hil.refos.image import read_boot_file

LABELS = ["resin-boot", "resin-rootA", "resin-rootB", "resin-state", "resin-data"]


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_cache_hit_does_no_work(images: Images) -> None:
    before = images.v1.disk.stat().st_mtime_ns
    t0 = time.monotonic()
    again = build(images.v1.arch, "1.0.0")
    assert again == images.v1
    assert again.disk.stat().st_mtime_ns == before
    assert time.monotonic() - t0 < 10  # version look-ups only


def test_a_build_in_progress_elsewhere_is_waited_for(images: Images) -> None:
    # Another session (make test runs two) holds the board's build lock: build() waits for it,
    # then takes the image from the cache rather than building over it. The lock is held for
    # longer than a cache hit takes, so a build() that did not wait would end before release.
    t0 = time.monotonic()
    build(images.v1.arch, "1.0.0")
    hold = max(2.0, 3 * (time.monotonic() - t0))
    other = HostLock(f"build-{images.v1.arch}", "a build", directory=build_mod.cache_dir("refos"))
    other.acquire(0, "another session's build")
    done: list[tuple[float, RefosImage]] = []

    def session() -> None:
        image = build(images.v1.arch, "1.0.0")
        done.append((time.monotonic(), image))

    t = threading.Thread(target=session)
    t.start()
    try:
        time.sleep(hold)  # the other session's build, as long as it takes
        released = time.monotonic()
    finally:
        other.release()
    t.join(60)
    assert done, "build() did not return within 60 s of the lock's release"
    finished, image = done[-1]
    assert image == images.v1
    assert finished >= released, "build() went on while another build held the lock"


def test_same_inputs_same_bytes(images: Images, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = build_mod.cache_dir

    def elsewhere(*parts: str) -> Path:  # a second image cache; the .deb cache is shared
        path = tmp_path.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr(build_mod, "cache_dir", elsewhere)
    rebuilt = build(images.v1.arch, "1.0.0")
    monkeypatch.setattr(build_mod, "cache_dir", real)
    assert rebuilt.disk != images.v1.disk
    for a, b in ((rebuilt.disk, images.v1.disk), (rebuilt.rootfs, images.v1.rootfs),
                 (rebuilt.bmap, images.v1.bmap)):
        assert sha(a) == sha(b), a.name


def test_partition_layout(images: Images) -> None:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(images.v1.disk)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    parts = {int(p["node"][len(str(images.v1.disk)):]): p for p in table["partitions"]}
    assert [parts[i]["name"] for i in range(1, 6)] == LABELS
    assert parts[1]["size"] * 512 == 40 << 20
    assert parts[2]["size"] * 512 == parts[3]["size"] * 512 == build_mod.ROOT_SIZE == 320 << 20
    assert images.v1.disk.stat().st_size == build_mod.DISK_SIZE == 1 << 30
    for i, label in enumerate(LABELS, start=1):
        out = subprocess.run(["blkid", "-p", "-O", str(parts[i]["start"] * 512), "-o", "export",
                              str(images.v1.disk)], capture_output=True, text=True).stdout
        assert f"LABEL={label}" in out, (label, out)
        fstype = "vfat" if label == "resin-boot" else "ext4"
        assert f"TYPE={fstype}" in out
    subprocess.run(["e2fsck", "-fn", str(images.v1.rootfs)], check=True, capture_output=True)


def test_bmap_copies_with_bmaptool(images: Images, tmp_path: Path) -> None:
    if shutil.which("bmaptool") is None:
        pytest.skip("bmaptool not installed")
    out = tmp_path / "flashed.img"
    subprocess.run(["bmaptool", "copy", "--bmap", str(images.v1.bmap), str(images.v1.disk),
                    str(out)], check=True, capture_output=True)
    assert sha(out) == sha(images.v1.disk)


def test_rootfs_has_every_library_its_binaries_load(images: Images, tmp_path: Path) -> None:
    tree = tmp_path / "root"
    tree.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(images.v1.rootfs)], check=True,
                   capture_output=True)
    libdir = next((tree / "lib").glob("*-linux-gnu"))
    checked = 0
    for path in sorted(tree.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix == ".ko":
            continue
        deps = elf_deps(path)
        if deps is None:
            continue
        checked += 1
        if deps.interp:
            assert (tree / deps.interp.lstrip("/")).exists(), (path, deps.interp)
        for soname in deps.needed:
            assert (libdir / soname).exists(), (path, soname)
    assert checked >= 10
    for tool in ("bin/busybox", "usr/sbin/chronyd", "usr/bin/chronyc", "usr/sbin/dropbear",
                 "usr/bin/jq", "sbin/tune2fs", "bin/findmnt", "usr/sbin/hostapp-update",
                 "usr/bin/rollback-health", "usr/bin/rollback-altboot", "boot/initrd.img"):
        assert (tree / tool).exists(), tool
    kernel = "Image" if images.v1.arch == "aarch64" else "vmlinuz"
    assert (tree / "boot" / kernel).stat().st_size > 5 << 20
    assert 'VERSION="1.0.0"' in (tree / "etc/os-release").read_text()


def test_health_check_values_live_in_the_script_as_on_balenaos(images: Images) -> None:
    def cat(img: RefosImage, path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(img.rootfs)], check=True,
                              capture_output=True, text=True).stdout

    script = cat(images.v2, "/usr/bin/rollback-health")
    # the lines balenaOS's tests rewrite with sed, once each, and nothing read over them
    assert [ln for ln in script.splitlines() if "COUNT=" in ln] == ["COUNT=15"]
    assert [ln for ln in script.splitlines() if "TIMEOUT=" in ln] == ["TIMEOUT=60"]
    assert ". \"$STATE_MNT/rollback-health-variables\"" not in script
    assert 'VERSION="2.0.0"' in cat(images.v2, "/etc/os-release")


def test_the_supervisor_and_its_imports_are_compiled_into_the_image(images: Images) -> None:
    def read(path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(images.v1.rootfs)],
                              check=True, capture_output=True).stdout

    for source in ("/usr/lib/hil/supervisor.py", "/usr/lib/python3.11/http/server.py",
                   "/usr/lib/python3.11/email/parser.py"):
        folder, name = source.rsplit("/", 1)
        pyc = read(f"{folder}/__pycache__/{name[:-3]}.cpython-311.pyc")
        assert pyc[:4] == importlib.util.MAGIC_NUMBER, f"{source}: no 3.11 bytecode"
        # checked hash (flags 0b11): a source replaced on the device is compiled again
        assert int.from_bytes(pyc[4:8], "little") == 0b11, source
        assert pyc[8:16] == importlib.util.source_hash(read(source)), f"{source}: stale"
    # the supervisor runs as a module: Python reads bytecode only for imported modules
    assert b"-m supervisor" in read("/usr/bin/start-balena-supervisor")


def test_configure_and_boot_env(images: Images, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    subprocess.run(["cp", "--sparse=always", str(images.v1.disk), str(disk)], check=True)
    assert boot_env(disk) == {"resin_root_part": "2", "upgrade_available": "0",
                              "bootcount": "0"}
    written = configure(disk, {"uuid": "abc", "hostname": "h1"})
    assert written["deviceType"] == images.v1.device_type
    raw = read_boot_file(disk, "config.json")
    assert raw is not None and json.loads(raw) == written
    assert hil_main(["refos", "configure", str(disk), "--prod", "--hostname", "h2"]) == 0
    raw = read_boot_file(disk, "config.json")
    assert raw is not None
    assert json.loads(raw)["developmentMode"] is False and json.loads(raw)["hostname"] == "h2"


def test_cli_build_prints_paths(images: Images, capsys: pytest.CaptureFixture[str]) -> None:
    assert hil_main(["refos", "build", "--arch", images.v1.arch, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disk"] == str(images.v1.disk) and out["rootfs"] == str(images.v1.rootfs)


def test_cli_rejects_bad_version() -> None:
    assert hil_main(["refos", "build", "--version", "1.0 beta"]) == 1


# --- units: registration server, cpio, ELF reader --------------------------------------------

def _post(url: str, body: dict[str, object] | None, key: str | None,
          path: str = "/device/register") -> tuple[int, dict[str, object]]:
    """POST ``body`` (GET without one) to ``path``, authorised by ``key``."""
    req = urllib.request.Request(url + path,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if text.startswith(b"{") else {"text": text.decode()}


def test_registration_server() -> None:
    with RegistrationServer() as api:
        assert api.url_for_guest == f"http://10.0.2.2:{api.port}"
        code, body = _post(api.url, {"uuid": "u1", "device_type": "generic-aarch64"},
                           api.api_key)
        assert code == 201 and body["uuid"] == "u1" and len(str(body["api_key"])) == 32
        assert _post(api.url, {"uuid": "u2"}, "wrong")[0] == 401
        assert _post(api.url, {"device_type": "x"}, api.api_key)[0] == 400
        reg = api.wait_for("u1", timeout=1)
        assert reg.device_api_key == body["api_key"]
        assert "api_key" not in repr(reg) and str(body["api_key"]) not in repr(reg)
        # the device's own key (balena's supervisor makes it) is the one registered
        own = "k" * 32
        code, body3 = _post(api.url, {"uuid": "a3", "device_type": "x", "api_key": own},
                            api.api_key)
        assert (code, body3["api_key"], body3["id"]) == (201, own, 3)
        # a uuid registered already: 409 with balena's API's words, not a second registration
        assert _post(api.url, {"uuid": "a3", "api_key": own}, api.api_key) == (
            409, {"text": '"uuid" must be unique.'})
        assert api.conflicts == ["a3"]
        assert [(r.uuid, r.auth_ok) for r in api.registrations] == [
            ("u1", True), ("u2", False), ("a3", True)]
        # the device asks for itself with its key (after a 409); another key finds nothing
        ask = "/v6/device?$filter=uuid%20eq%20'a3'"
        assert _post(api.url, None, own, ask) == (200, {"d": [{"id": 3, "uuid": "a3"}]})
        assert _post(api.url, None, str(body["api_key"]), ask) == (200, {"d": []})
        with pytest.raises(NotReached, match="the device to register as u9"):
            api.wait_for("u9", timeout=0.3)  # a device that never registers fails the test
        with urllib.request.urlopen(api.url + "/ping", timeout=5) as resp:
            assert resp.read() == b"OK"
        # os-config's service configuration, for the devices it issued a key to
        assert _post(api.url, None, "wrong", "/os/v1/config")[0] == 401
        code, config = _post(api.url, None, str(body["api_key"]), "/os/v1/config")
        cloud = f"{api.cloud_key.get_name()} {api.cloud_key.get_base64()}"
        assert code == 200 and config["schema_version"] == "1.0.0"
        assert str(config["services"]).count(cloud) == 1
        assert api.config_fetches == ["u1"]


def test_cpio_is_sorted_and_fixed(tmp_path: Path) -> None:
    (tmp_path / "b").write_text("bee")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("ex")
    (tmp_path / "l").symlink_to("b")
    one = cpio_newc(tmp_path, 1000, {"dev/console": (5, 1)})
    (tmp_path / "b").touch()
    assert cpio_newc(tmp_path, 1000, {"dev/console": (5, 1)}) == one
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=one, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["a", "a/x", "b", "dev/console", "l"]


def test_elf_reader_matches_readelf() -> None:
    deps = elf_deps(Path("/bin/ls"))
    assert deps is not None and deps.interp and "libc.so.6" in deps.needed
    readelf = subprocess.run(["readelf", "-d", "/bin/ls"], capture_output=True, text=True)
    if readelf.returncode == 0:
        for soname in deps.needed:
            assert f"[{soname}]" in readelf.stdout
    assert elf_deps(Path(__file__)) is None


def test_json_flattener_agrees_with_jq(tmp_path: Path) -> None:
    """The guest reads config.json at boot with json-flat.awk (busybox awk) instead of jq."""
    if shutil.which("busybox") is None or shutil.which("jq") is None:
        pytest.skip("needs the host's busybox and jq")
    script = Path(build_mod.__file__).parent / "files/rootfs/usr/lib/hil/json-flat.awk"
    doc = {"uuid": "0123abc", "hostname": 'we"ird\\name', "developmentMode": True,
           "persistentLogging": False, "os": {"sshKeys": ["ssh-ed25519 AAAA k1",
                                                          "ssh-rsa B/C k2"], "udevRules": {}},
           "ntpServers": "a.example 10.0.2.2", "n": 12, "z": None,
           "nested": [[1, 2], {"q": "w"}], "empty": []}
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(doc, indent=1))
    flat = subprocess.run(["busybox", "awk", "-f", str(script), str(cfg)], check=True,
                          capture_output=True, text=True).stdout
    got = dict(line.split("\t", 1) for line in flat.splitlines())
    jq = subprocess.run(["jq", "-r", '[paths(type != "object" and type != "array")] | .[] | '
                         'map(if type == "number" then "[\\(.)]" else ".\\(.)" end) | add',
                         str(cfg)], check=True, capture_output=True, text=True).stdout.split()
    assert sorted(got) == sorted(jq)
    assert got[".hostname"] == 'we"ird\\name'
    assert got[".os.sshKeys[1]"] == "ssh-rsa B/C k2"
    assert got[".developmentMode"] == "true" and got[".z"] == "null"


def test_bootloader_config_modify_sets_and_removes_allowed_kernel_arguments(
        tmp_path: Path) -> None:
    """The guest's bootloader_config_modify (busybox sh), on a boot partition as the images
    ship it: a kernel argument on balenaOS's list set in U-Boot's extra_uEnv.txt and GRUB's
    grub_extraenv (a block grub-editenv reads), set again without a write, removed; one off
    the list refused; a file the image does not ship never created; each call under the lock."""
    if shutil.which("busybox") is None or shutil.which("grub-editenv") is None:
        pytest.skip("needs the host's busybox and grub-editenv")
    files = Path(build_mod.__file__).parent / "files/rootfs"
    boot = tmp_path / "boot"
    (boot / "grub").mkdir(parents=True)
    (boot / "extra_uEnv.txt").write_text("")
    subprocess.run(["grub-editenv", str(boot / "grub/grub_extraenv"), "create"], check=True)
    fw = "firmware_class.path=/var/lib/docker/volumes/extra-firmware/_data"

    def modify(*args: str) -> subprocess.CompletedProcess[str]:
        common = "\n".join(ln for ln in (files / "usr/lib/hil/common.sh").read_text()
                           .splitlines() if "build.env" not in ln)  # the image's settings
        script = (f"{common}\nBOOT_MNT={boot}\n. {files}/usr/libexec/os-helpers-bootloader-config"
                  f"\nBOOTLOADER_CONFIG_LOCK_FILE={tmp_path}/bootloader_config.lock"
                  f"\nbootloader_config_modify {' '.join(args)}")
        return subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True,
                              timeout=60)

    def grub_env() -> str:
        return subprocess.run(["grub-editenv", str(boot / "grub/grub_extraenv"), "list"],
                              check=True, capture_output=True, text=True).stdout

    assert modify("extra_os_firmware_class_path", fw).returncode == 0
    assert (tmp_path / "bootloader_config.lock").exists()  # one writer at a time, as balenaOS
    assert (boot / "extra_uEnv.txt").read_text() == f"extra_os_firmware_class_path={fw}\n"
    assert grub_env() == f"extra_os_firmware_class_path={fw}\n"
    assert (boot / "grub/grub_extraenv").stat().st_size == 1024
    before = {p: p.stat().st_mtime_ns for p in boot.rglob("*") if p.is_file()}
    r = modify("extra_os_firmware_class_path", fw)
    assert r.returncode == 0 and "has been set" not in r.stderr
    assert before == {p: p.stat().st_mtime_ns for p in boot.rglob("*") if p.is_file()}
    r = modify("extra_os_cmdline", "init=/bin/sh")
    assert r.returncode != 0 and "not in whitelist" in r.stderr
    assert "extra_os_cmdline" not in grub_env()
    assert modify("extra_os_firmware_class_path").returncode == 0
    assert (boot / "extra_uEnv.txt").read_text() == "" and grub_env() == ""
    (boot / "extra_uEnv.txt").unlink()
    assert modify("extra_os_firmware_class_path", fw).returncode == 0
    assert not (boot / "extra_uEnv.txt").exists()


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_qemu_argv_boots_the_rigs_board(arch: str, tmp_path: Path) -> None:
    # the boot by hand and these tests run the qemu-<arch> rig's board: the same command line
    # but for the console (stdio here, the rig's socket and QMP there) and the disk's cache
    from hil.config import load_rig
    from hil.qemu.target import QemuTarget
    from hil.refos.qemu import board_settings, qemu_argv
    from hil.registry import PartContext

    rig = load_rig(str(Path(__file__).parents[2] / "rigs" / f"qemu-{arch}.yaml"))
    settings = rig.parts["target"].settings
    assert settings == board_settings(arch)
    disk = tmp_path / "disk.img"
    target = QemuTarget(settings.model_copy(update={"write_cache": "host", "disk": disk}),
                        PartContext(rig.name, "target", tmp_path, rig.device_type))
    target.binary = f"qemu-system-{arch}"  # whether or not this host has it
    target.ssh_port = 2222
    rigs = target.command()
    for option in ("-qmp", "-chardev", "-serial"):
        i = rigs.index(option)
        del rigs[i:i + 2]
    ours = qemu_argv(arch, disk, ssh_port=2222)
    i = ours.index("-serial")
    assert ours[i:i + 2] == ["-serial", "stdio"]
    del ours[i:i + 2]
    assert ours == rigs
