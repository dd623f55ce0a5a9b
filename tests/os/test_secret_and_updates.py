"""Secrets read from a device never print; a leak is found plain or base64-encoded; update
images are recognised by content; the rig-side partition reader and fsck on a real ext4."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from hil import redact
from hil.errors import ConfigError
from hil.os import Secret, UpdateImage, hostdisk
from hil.os.balena import secrets_in
from hil.os.secret import private_key_stretch


def test_secret_repr_is_a_fingerprint_and_value_is_masked() -> None:
    s = Secret("0123456789abcdef0123456789abcdef")
    assert "0123456789abcdef" not in repr(s) and "0123456789abcdef" not in str(s)
    assert s.matches("0123456789abcdef0123456789abcdef") and not s.matches("nope")
    assert s == Secret(digest=s.sha256) and s.matches(Secret(digest=s.sha256))
    assert "0123456789abcdef0123" not in redact.text("key 0123456789abcdef0123456789abcdef")
    only_digest = Secret(digest=s.sha256)
    with pytest.raises(ValueError):
        only_digest.reveal()


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"x" * 100])
def test_leak_found_plain_and_base64_at_any_alignment(prefix: bytes) -> None:
    key = "f00dfeedcafebeef0123456789abcdef"
    stream = base64.encodebytes(prefix + key.encode() + b"\n")  # wrapped like base64(1)
    assert secrets_in(stream, [("deviceApiKey", key)]) == ["deviceApiKey"]
    assert secrets_in(b"log " + key.encode(), [("k", key)]) == ["k"]
    assert secrets_in(base64.encodebytes(prefix + b"other text entirely"), [("k", key)]) == []


def test_private_key_stretch_is_the_secret_part(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen")
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True)
    stretch = private_key_stretch(key)
    text = key.read_text()
    assert len(stretch) >= 40 and stretch in text.replace("\n", "")
    # the public key is not secret: the stretch must not be part of it
    assert stretch not in key.with_suffix(".pub").read_text()


def _mkext4(path: Path, version: str, tmp: Path) -> None:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text(f'ID="balena-os"\nVERSION="{version}"\n')
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "resin-rootB", "-d", str(root), str(path),
                    "8M"], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None and not Path("/sbin/mkfs.ext4").exists(),
                    reason="no mkfs.ext4")
def test_update_image_kinds(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.img"
    _mkext4(rootfs, "9.9.9", tmp_path)
    img = UpdateImage.from_option(str(rootfs))
    assert img.kind == "rootfs" and img.version == "9.9.9"
    tar = tmp_path / "hostapp.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(tmp_path), "root"], check=True)
    assert UpdateImage.from_option(str(tar)).kind == "hostapp"
    assert UpdateImage.from_option("registry.example/balena-os:2.115.0").kind == "ref"
    with pytest.raises(ConfigError, match="not found"):
        UpdateImage.from_option(str(tmp_path / "missing.img"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\1" * 4096)
    with pytest.raises(ConfigError, match="neither"):
        UpdateImage.from_option(str(junk))


@pytest.mark.skipif(shutil.which("sfdisk") is None and not Path("/sbin/sfdisk").exists(),
                    reason="no sfdisk")
def test_rig_side_partition_labels_and_fsck(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(40 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"label: gpt\nsize=16MiB\nsize=16MiB\n",
                   check=True)
    part = tmp_path / "p.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "resin-data", str(part), "16M"], check=True)
    parts = hostdisk.partitions(disk)
    with disk.open("r+b") as f:
        f.seek(parts[1].offset)
        f.write(part.read_bytes())
    assert [p.label for p in hostdisk.partitions(disk)][1] == "resin-data"
    assert hostdisk.fsck(disk, "resin-data", workdir=tmp_path).clean
    # damage the root directory's inode table: e2fsck must notice
    from hil.os.hostdisk import partition

    data = partition(disk, "resin-data")
    out = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True).stdout
    block = 1024 if "Block size:               1024" in out else 4096
    itable = subprocess.run(["dumpe2fs", str(part)], capture_output=True, text=True).stdout
    first = next(int(ln.split("Inode table at ")[1].split("-")[0])
                 for ln in itable.splitlines() if "Inode table at" in ln)
    with disk.open("r+b") as f:
        f.seek(data.offset + first * block + 256)  # inode 2 (the root directory)
        f.write(b"\xff" * 256)
    assert not hostdisk.fsck(disk, "resin-data", workdir=tmp_path).clean
    with pytest.raises(FileNotFoundError, match="resin-boot"):
        hostdisk.partition(disk, "resin-boot")


def test_rig_side_boot_files_and_bootloader_state(tmp_path: Path) -> None:
    from hil.flash import fat
    from hil.flash.partitions import GptEntry, write_gpt

    disk = tmp_path / "disk.img"
    linux = "0FC63DAF-8483-4772-8E79-3D69E4C7984D"
    boot = write_gpt(disk, 64 << 20, "01234567-89ab-cdef-0123-456789abcdef", [
        GptEntry("resin-rootA", 16 << 20, linux, "11111111-2222-3333-4444-555555555555"),
        GptEntry("resin-boot", 40 << 20, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
                 "66666666-7777-8888-9999-aaaaaaaaaaaa")])[1]
    fat.make_fat(disk, boot, label="resin-boot", volume_id="0000abcd")
    assert hostdisk.read_boot_file(disk, "resinOS_uEnv.txt") is None
    hostdisk.write_boot_file(disk, "resinOS_uEnv.txt", b"resin_root_part=3\nupgrade_available=1\n")
    hostdisk.write_boot_file(disk, "bootcount.env", b"bootcount=2\n")
    assert hostdisk.read_boot_file(disk, "bootcount.env") == b"bootcount=2\n"
    state = hostdisk.boot_state(disk, "uboot")
    assert (state.resin_root_part, state.upgrade_available, state.bootcount) == (3, 1, 2)
