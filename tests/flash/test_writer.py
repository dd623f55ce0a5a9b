"""flash(): the target ends up byte-identical to the image; failures are clear and prompt."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hil.errors import ConfigError, InfraError
from hil.flash.bmap import create_bmap, write_bmap
from hil.flash.progress import FlashProgress
from hil.flash.writer import flash

from .conftest import ImageFixture, Loops, read_all


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


FORMATS = ["raw", "gz", "xz", "zst", "zip", "bz2"]
GARBAGE = b"\xa5stale-card-content\x5a"


@pytest.fixture(scope="module")
def bmap_file(image: ImageFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bmap(create_bmap(image.raw), tmp_path_factory.mktemp("bmap") / "disk.bmap")


@pytest.mark.parametrize("use_bmap", [False, True], ids=["nobmap", "bmap"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_file_target_is_identical(image: ImageFixture, bmap_file: Path, tmp_path: Path,
                                  fmt: str, use_bmap: bool) -> None:
    out = tmp_path / "sd.img"
    out.write_bytes(GARBAGE * 1000)  # an old, smaller disk file: its content must go
    report = flash(image.variants[fmt], out, bmap=bmap_file if use_bmap else None,
                   display=False)
    assert out.stat().st_size == image.size
    assert read_all(out, image.size + 1) == image.data
    assert report.verified is True
    assert report.image_size == image.size
    assert 20 << 20 < report.bytes_written < 22 << 20  # only the data, not the 40 MiB
    assert out.stat().st_blocks * 512 < 24 << 20  # and the file stays sparse


def test_larger_disk_file_keeps_its_size(image: ImageFixture, tmp_path: Path) -> None:
    out = tmp_path / "qemu-disk.img"
    with open(out, "wb") as f:
        f.write(GARBAGE * 100_000)
        f.truncate(64 << 20)
    flash(image.raw, out, display=False)
    assert out.stat().st_size == 64 << 20  # a virtual disk keeps its capacity ...
    assert read_all(out, 64 << 20) == image.data + bytes((64 << 20) - image.size)  # ... zeroed


@pytest.mark.parametrize("fmt", ["raw", "zst", "gz", "zip"])
def test_loop_device_is_identical_without_bmap(image: ImageFixture, loops: Loops,
                                               fmt: str) -> None:
    dev = loops.make(48 << 20, fill=GARBAGE)  # stale content everywhere
    report = flash(image.variants[fmt], dev, allow_fixed=True, display=False)
    assert read_all(dev, image.size) == image.data  # empty areas were zeroed, not skipped
    assert report.verified is True
    assert "zeroed" in report.zeroing


@pytest.mark.parametrize("fmt", ["raw", "xz", "zst"])
def test_loop_device_with_bmap(image: ImageFixture, bmap_file: Path, loops: Loops,
                               fmt: str) -> None:
    dev = loops.make(48 << 20)  # a fresh (zero) device: with a bmap only mapped blocks move
    report = flash(image.variants[fmt], dev, bmap=bmap_file, allow_fixed=True, display=False)
    assert read_all(dev, image.size) == image.data
    assert report.verified is True


def test_zero_fill_makes_a_stale_device_exact_even_with_bmap(image: ImageFixture,
                                                             bmap_file: Path,
                                                             loops: Loops) -> None:
    dev = loops.make(48 << 20, fill=GARBAGE)
    report = flash(image.variants["zst"], dev, bmap=bmap_file, zero_fill=True,
                   allow_fixed=True, display=False)
    assert read_all(dev, image.size) == image.data
    assert "zero-filled" in report.zeroing


def test_progress_reaches_the_end(image: ImageFixture, tmp_path: Path) -> None:
    seen: list[FlashProgress] = []
    flash(image.variants["zst"], tmp_path / "out.img", progress=seen.append, display=False)
    writes = [p for p in seen if p.phase == "write"]
    verifies = [p for p in seen if p.phase == "verify"]
    assert writes[-1].done == writes[-1].total == image.size
    assert verifies[-1].done == verifies[-1].total == writes[-1].written
    assert [p.done for p in writes] == sorted(p.done for p in writes)


def test_corrupt_compressed_image_is_an_error(image: ImageFixture, tmp_path: Path) -> None:
    data = bytearray(image.variants["gz"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.img.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InfraError, match=r"bad\.img\.gz: gzip image is corrupt .* offset \d+"):
        flash(bad, tmp_path / "out.img", display=False)


@pytest.mark.parametrize("fmt", ["zst", "xz", "zip"])
def test_truncated_image_is_refused_before_writing(image: ImageFixture, tmp_path: Path,
                                                   fmt: str) -> None:
    src = image.variants[fmt]
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out.img"
    with pytest.raises(InfraError, match=str(cut)):
        flash(cut, out, display=False)
    assert not out.exists()  # these formats let us notice before the first byte


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "noverify"])
@pytest.mark.parametrize("fmt", ["raw", "zst"])
def test_bmap_checksum_mismatch_names_the_range(image: ImageFixture, bmap_file: Path,
                                                tmp_path: Path, fmt: str, verify: bool) -> None:
    # with verify, the bmap's checksums are checked on the data read back (one hash pass);
    # without, on the data streamed (as bmaptool does): the same message either way
    changed = bytearray(image.data)
    changed[(10 << 20) + 12345] ^= 0x01  # inside the 20 MiB run at 10 MiB
    raw = tmp_path / "changed.img"
    raw.write_bytes(bytes(changed))
    src = raw
    if fmt == "zst":
        subprocess.run(["zstd", "-q", "-1", str(raw)], check=True, timeout=60)
        src = tmp_path / "changed.img.zst"
    with pytest.raises(InfraError, match=r"bmap range 2560-7679 \(bytes 10485760-31457279\) "
                       r"of .*disk\.bmap: the image data there has sha256"):
        flash(src, tmp_path / "out.img", bmap=bmap_file, verify=verify, display=False)


def test_format_1_3_bmap_with_sha1(image: ImageFixture, tmp_path: Path) -> None:
    from .test_bmap import _v13

    bmap = tmp_path / "old.bmap"
    bmap.write_text(_v13(image))
    out = tmp_path / "out.img"
    report = flash(image.variants["gz"], out, bmap=bmap, display=False)
    assert report.bytes_written == (16 + 75) * 4096  # only what the old bmap maps
    data = read_all(out, image.size)
    assert data[:16 * 4096] == image.data[:16 * 4096]
    assert data[256 * 4096:331 * 4096] == image.data[256 * 4096:331 * 4096]
    changed = bytearray(image.data)
    changed[300 * 4096] ^= 1
    (tmp_path / "changed.img").write_bytes(bytes(changed))
    with pytest.raises(InfraError, match=r"bmap range 256-330 .* has sha1"):
        flash(tmp_path / "changed.img", out, bmap=bmap, display=False)


def test_bmap_of_another_image_is_refused(image: ImageFixture, bmap_file: Path,
                                          tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(image.data[: 8 << 20])
    with pytest.raises(ConfigError, match="wrong bmap for this image"):
        flash(other, tmp_path / "out.img", bmap=bmap_file, display=False)


@pytest.mark.parametrize("use_bmap", [False, True], ids=["nobmap", "bmap"])
def test_verify_finds_the_first_bad_byte(image: ImageFixture, bmap_file: Path, tmp_path: Path,
                                         use_bmap: bool) -> None:
    # with the bmap, the raw image is copied inside the kernel and read back afterwards
    out = tmp_path / "out.img"
    bad_offset = image.size - 100  # in the last run, which is read back after the write ends

    def corrupt(p: FlashProgress) -> None:
        if p.phase == "write" and p.done == p.total:
            with open(out, "r+b") as f:  # something else writes to the medium
                f.seek(bad_offset)
                f.write(bytes([image.data[bad_offset] ^ 0xFF]))

    with pytest.raises(InfraError, match=rf"verify failed: .* at offset {bad_offset} "):
        flash(image.raw, out, bmap=bmap_file if use_bmap else None, progress=corrupt,
              display=False)


def test_ctrl_c_stops_promptly(image: ImageFixture, loops: Loops) -> None:
    dev = loops.make(48 << 20)

    def interrupt(p: FlashProgress) -> None:
        if p.phase == "write" and p.done > 8 << 20:
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        flash(image.variants["zst"], dev, progress=interrupt, allow_fixed=True, display=False)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while any(t.name.startswith("flash-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "flash threads still running after Ctrl-C"
        time.sleep(0.05)
    with open(dev, "rb") as f:  # and the device is not left open exclusively
        f.read(512)


def test_detached_loop_device_mid_write(image: ImageFixture, loops: Loops) -> None:
    dev = loops.make(48 << 20)
    detached: list[float] = []

    def detach_half_way(p: FlashProgress) -> None:
        if p.phase == "write" and p.done >= p.total // 2 and not detached:
            loops.detach(dev)
            detached.append(time.monotonic())

    with pytest.raises(InfraError, match=rf"{dev} .* vanished during the write .*detached"):
        flash(image.raw, dev, progress=detach_half_way, allow_fixed=True, display=False)
    assert detached and time.monotonic() - detached[0] < 5  # noticed promptly, no hang
    backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
    deadline = time.monotonic() + 5  # once we let go, the kernel completes the detach
    while str(loops.backing(dev)) in _read_text(backing):
        assert time.monotonic() < deadline, f"{dev} still attached after flash() returned"
        time.sleep(0.05)


def test_too_small_device_is_refused_untouched(image: ImageFixture, loops: Loops) -> None:
    dev = loops.make(16 << 20, fill=GARBAGE)
    before = read_all(dev, 16 << 20)
    with pytest.raises(InfraError, match=r"holds 16777216 bytes .* but the image .*disk\.img"
                       rf"\.zst needs {image.size} bytes.*nothing was written"):
        flash(image.variants["zst"], dev, allow_fixed=True, display=False)
    assert read_all(dev, 16 << 20) == before


def test_image_longer_than_device_found_while_streaming(image: ImageFixture, loops: Loops,
                                                         tmp_path: Path) -> None:
    # a gzip whose size field lies (multi-member: only the last member's size is recorded)
    import gzip
    gz = tmp_path / "multi.img.gz"
    gz.write_bytes(gzip.compress(image.data[:-4096]) + gzip.compress(image.data[-4096:]))
    dev = loops.make(32 << 20)
    with pytest.raises(InfraError, match=r"multi\.img\.gz decompresses to more than .* past "
                       r"byte 33554432; .* holds an incomplete or unverified image"):
        flash(gz, dev, allow_fixed=True, display=False)


def test_non_removable_device_needs_allow_fixed(image: ImageFixture, loops: Loops) -> None:
    dev = loops.make(48 << 20, fill=GARBAGE)
    with pytest.raises(InfraError, match=r"not a removable disk.*--allow-fixed"):
        flash(image.raw, dev, display=False)
    assert read_all(dev, 4096) == (GARBAGE * 300)[:4096]


def test_mounted_device_is_refused_untouched(image: ImageFixture, loops: Loops,
                                             tmp_path: Path) -> None:
    dev = loops.make(48 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=60)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", dev, str(mnt)], capture_output=True, timeout=60).returncode:
        pytest.skip("cannot mount ext4 here")
    try:
        with pytest.raises(InfraError, match=rf"{dev} is mounted at {mnt}"):
            flash(image.raw, dev, allow_fixed=True, display=False)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    after = read_all(dev, 64 << 10)  # (mount itself updates the superblock: compare content)
    assert after[1080:1082] == b"\x53\xef"  # the ext4 superblock is still there
    assert after != image.data[: 64 << 10]


def test_stable_name_is_resolved_and_logged(image: ImageFixture, loops: Loops, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    dev = loops.make(48 << 20)
    link = tmp_path / "usb-Generic_SD_Reader_000000001-0:0"  # as in /dev/disk/by-id
    link.symlink_to(dev)
    caplog.set_level("INFO", logger="hil.flash")
    flash(image.raw, link, allow_fixed=True, display=False)
    assert f"flash target {link} resolves to {dev} (loop device on" in caplog.text
    assert read_all(dev, image.size) == image.data


def test_refuses_to_overwrite_its_own_image(image: ImageFixture, tmp_path: Path) -> None:
    copy = tmp_path / "disk.img"
    copy.write_bytes(image.data)
    with pytest.raises(InfraError, match="it is the image being flashed"):
        flash(copy, copy, display=False)
    assert copy.read_bytes() == image.data


def test_host_root_disk_is_refused(image: ImageFixture) -> None:
    root = os.stat("/").st_dev
    nodes = [p for p in Path("/dev").iterdir() if p.is_block_device() and p.stat().st_rdev == root]
    if not nodes:
        pytest.skip("the root filesystem is not on a block device node in /dev")
    path = nodes[0]
    with pytest.raises(InfraError, match=rf"refusing to write {path}: .*(root|mounted)"):
        flash(image.raw, path, allow_fixed=True, display=False)


def test_swap_device_is_refused(image: ImageFixture, loops: Loops) -> None:
    dev = loops.make(48 << 20)
    subprocess.run(["mkswap", dev], check=True, capture_output=True, timeout=60)
    if subprocess.run(["swapon", dev], capture_output=True, timeout=60).returncode:
        pytest.skip("swapon is not possible here")
    try:
        with pytest.raises(InfraError, match=rf"{dev} is in use as swap"):
            flash(image.raw, dev, allow_fixed=True, display=False)
    finally:
        subprocess.run(["swapoff", dev], check=True, timeout=60)
