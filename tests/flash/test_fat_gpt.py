"""Writing images: a GPT (sfdisk) and a FAT partition's files (mtools) that give the same bytes
for the same inputs, read back by the pure-Python table reader and by mtools."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.flash import fat
from hil.flash.partitions import GptEntry, read_partitions, write_gpt

MiB = 1 << 20
LINUX = "0FC63DAF-8483-4772-8E79-3D69E4C7984D"
FAT = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
ENTRIES = [GptEntry("boot", 24 * MiB, FAT, "11111111-2222-3333-4444-555555555555", 1 * MiB,
                    "LegacyBIOSBootable"),
           GptEntry("root", None, LINUX, "66666666-7777-8888-9999-aaaaaaaaaaaa")]
FILES = {"config.json": b'{"a": 1}\n', "grub/grub.cfg": b"set default=0\n",
         "deep/er/file": b"x" * 5000}


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("sfdisk", "mkfs.fat", "mcopy", "mtype", "mdir", "mmd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (fdisk, dosfstools, mtools)")


def _image(path: Path, epoch: int) -> str:
    parts = write_gpt(path, 64 * MiB, "01234567-89ab-cdef-0123-456789abcdef", ENTRIES)
    fat.make_fat(path, parts[0], label="hil-boot", volume_id="1234abcd")
    fat.write_files(path, parts[0], FILES, epoch=epoch)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gpt_and_fat_read_back(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    _image(disk, 1704067200)
    kind, parts = read_partitions(disk)
    assert kind == "gpt"
    assert [(p.number, p.name, p.start, p.type) for p in parts] == [
        (1, "boot", 1 * MiB, FAT), (2, "root", 25 * MiB, LINUX)]
    assert parts[0].size == 24 * MiB and parts[1].size >= 38 * MiB  # the rest, less the backup
    assert (parts[0].fs_type, parts[0].fs_label) == ("FAT16", "hil-boot")
    for name, data in FILES.items():
        assert fat.read_file(disk, parts[0], name) == data
    assert fat.read_file(disk, parts[0], "missing") is None
    fat.write_files(disk, parts[0], {"grub/grub.cfg": b"replaced\n"})  # in place, now's time
    assert fat.read_file(disk, parts[0], "grub/grub.cfg") == b"replaced\n"


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    one = _image(tmp_path / "1.img", 1704067200)
    assert _image(tmp_path / "2.img", 1704067200) == one
    assert _image(tmp_path / "3.img", 1704067200 + 86400) != one  # the epoch is in the bytes


def test_a_failing_tool_names_the_partition_and_masks_secrets(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    parts = write_gpt(disk, 64 * MiB, "01234567-89ab-cdef-0123-456789abcdef", ENTRIES)
    # no filesystem made: mtools refuse, and the secret in the file's name stays out
    with pytest.raises(InfraError, match=r"mmd ::/\S+ on .*\(partition 1\) failed") as err:
        fat.write_files(disk, parts[0], {"S3CRET/x": b"1"}, secrets=["S3CRET"])
    assert "S3CRET" not in str(err.value)
