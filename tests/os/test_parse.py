"""The host-OS adapter's parsers, on text as balenaOS and the reference OS print it."""

from __future__ import annotations

import pytest

from hil.os import parse
from hil.os.parse import BootState, Mount


def test_os_release_quotes_and_escapes() -> None:
    text = ('ID="balena-os"\nNAME=balenaOS\nVERSION="2.115.3"\n# comment\n\n'
            "PRETTY_NAME='balenaOS 2.115.3'\nQUOTED=\"a \\\"b\\\" \\$c\"\nEMPTY=\n")
    r = parse.os_release(text)
    assert r["ID"] == "balena-os" and r["NAME"] == "balenaOS" and r["VERSION"] == "2.115.3"
    assert r["PRETTY_NAME"] == "balenaOS 2.115.3"
    assert r["QUOTED"] == 'a "b" $c'
    assert r["EMPTY"] == ""


def test_uboot_env_files_with_nul_terminator() -> None:
    # U-Boot's `env export -t` ends the text with NUL; balenaOS's files are plain lines
    uenv = b"resin_root_part=3\nupgrade_available=1\n\0\0"
    count = b"bootcount=2\n\0"
    env = parse.env_file(uenv)
    env.update(parse.env_file(count))
    assert parse.boot_state(env) == BootState(3, 1, 2)


def test_grubenv_block() -> None:
    body = "# GRUB Environment Block\nresin_root_part=2\nupgrade_available=0\nbootcount=0\n"
    block = (body + "#" * (1024 - len(body))).encode()
    assert len(block) == 1024
    assert parse.boot_state(parse.env_file(block)) == BootState(2, 0, 0)


def test_boot_state_defaults_last_assignment_and_hex() -> None:
    assert parse.boot_state({}) == BootState(2, 0, 0)
    assert parse.env_file("bootcount=1\nbootcount=4\n")["bootcount"] == "4"
    assert parse.boot_state({"resin_root_part": "0x3", "bootcount": "1"}) == BootState(3, 0, 1)
    with pytest.raises(parse.BootEnvError, match="bootcount"):
        parse.boot_state({"bootcount": "lots"})


def test_env_file_ignores_junk() -> None:
    env = parse.env_file("garbage line\n=novalue\nbad key=1\nok_key=1\n#x=2\n")
    assert env == {"ok_key": "1"}


def test_boot_lines_from_the_console() -> None:
    console = (b"U-Boot 2023.01\r\nHIL-BOOT: root=3 resin_root_part=3 bootcount=1 "
               b"upgrade_available=1\r\n...\r\nHIL-BOOT: root=2 resin_root_part=3 bootcount=4 "
               b"upgrade_available=1\r\n")
    lines = parse.boot_lines(console)
    assert lines == [parse.BootLine(3, BootState(3, 1, 1)), parse.BootLine(2, BootState(3, 1, 4))]
    assert str(lines[1].state) == "resin_root_part=3 upgrade_available=1 bootcount=4"


def test_findmnt_raw_output() -> None:
    text = ("/dev/vda2 / ext4 ro,relatime\n"
            "/dev/vda5 /mnt/data ext4 rw,noatime\n"
            "/dev/vda5[/resin-data] /data ext4 rw,noatime\n"
            "tmpfs /mnt/with\\x20space tmpfs rw\n"
            "tmpfs /data tmpfs rw\n")
    mounts = parse.findmnt(text)
    assert mounts[0] == Mount("/dev/vda2", "/", "ext4", ("ro", "relatime"))
    assert mounts[0].read_only and not mounts[1].read_only
    assert mounts[3].target == "/mnt/with space"
    # the last mount at a point is the one that is seen (a tmpfs over /data hides resin-data)
    seen = parse.mount_at(mounts, "/data")
    assert seen is not None and seen.fstype == "tmpfs"
    assert parse.mount_at(mounts, "/nowhere") is None


def test_proc_mounts_octal_escapes() -> None:
    m = parse.proc_mounts("/dev/sda1 /mnt/a\\040b vfat rw,noatime 0 0\n")
    assert m == [Mount("/dev/sda1", "/mnt/a b", "vfat", ("rw", "noatime"))]


@pytest.mark.parametrize(("device", "number"), [
    ("/dev/vda3", 3), ("/dev/sda12", 12), ("/dev/mmcblk0p2", 2), ("/dev/nvme0n1p5", 5),
    ("/dev/xvda1", 1), ("/dev/mmcblk1", None), ("/dev/vda", None), ("/dev/nvme0n1", None),
    ("/dev/loop0p1", 1)])
def test_partition_number(device: str, number: int | None) -> None:
    assert parse.partition_number(device) == number


def test_records_intact_series_and_torn_tail() -> None:
    data = b"".join(parse.record(n) for n in range(1, 6))
    assert len(parse.record(7)) == parse.RECORD_SIZE
    assert parse.check_records(data) == parse.RecordCheck(5, "nothing", None)
    torn = data + parse.record(6)[:10]
    got = parse.check_records(torn)
    assert got.complete == 5 and got.problem is None and "torn record 6" in got.tail
    zeros = data + b"\0" * 100
    got = parse.check_records(zeros)
    assert got.complete == 5 and got.problem is None and "zero" in got.tail


def test_records_gap_or_garbage_is_a_problem() -> None:
    gap = parse.record(1) + parse.record(3)
    got = parse.check_records(gap)
    assert got.complete == 1 and got.problem is not None
    garbage = parse.record(1) + b"X" * parse.RECORD_SIZE + parse.record(3)
    assert parse.check_records(garbage).problem is not None
    assert parse.check_records(b"").complete == 0


def test_acknowledgements_per_writer_token() -> None:
    console = (b"HIL-ACK aa11 1\r\nHIL-ACK aa11 2\r\nnoise HIL-ACK bb22 9\r\n"
               b"[  3.1] kernel line\r\nHIL-ACK aa11 3\r\nHIL-ACK aa11 2")
    assert parse.acknowledged(console, "aa11") == 3
    assert parse.acknowledged(console, "bb22") == 9
    assert parse.acknowledged(console, "cc33") == 0
