"""configure_image: config.json lands in the boot partition of GPT and MBR images, read back with
mtools; results are cached; secrets stay out of logs and messages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from hil.errors import ConfigError
from hil.flash import configure, fat
from hil.flash.bmap import parse_bmap
from hil.flash.configure import bmap_path, configure_image
from hil.flash.partitions import read_partitions
from hil.flash.writer import flash
from hil.redact import REDACTED, redact, redact_text, secret_values

from .conftest import read_all

MiB = 1 << 20
CONFIG = {"uuid": "0123456789abcdef", "hostname": "dut-1", "apiKey": "PROVISIONING-SECRET-1",
          "deviceApiKey": "DEVICE-SECRET-22", "developmentMode": True,
          "os": {"sshKeys": ["ssh-ed25519 AAAAC3Nza test@hil"]}}
SECRETS = ("PROVISIONING-SECRET-1", "DEVICE-SECRET-22")


def _tools() -> None:
    for tool in ("sfdisk", "mkfs.fat", "mcopy", "mtype"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (util-linux, dosfstools, mtools)")


def _run(*cmd: str, stdin: str | None = None) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True, env=env,
                          timeout=60).stdout


def make_gpt(path: Path) -> int:
    """GPT: p1 'resin-boot' (FAT16 labelled differently: the GPT name must do), p2 rootA."""
    _tools()
    with open(path, "wb") as f:
        f.truncate(96 * MiB)
    _run("sfdisk", "-q", str(path), stdin=(
        "label: gpt\n"
        "start=2048, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=resin-boot\n"
        "type=0FC63DAF-8483-4772-8E79-3D69E4C7984D, name=resin-rootA\n"))
    _run("mkfs.fat", "-F", "16", "-n", "FLASHBOOT", "--offset=2048", str(path), "32768")
    return 2048 * 512


def make_mbr(path: Path) -> int:
    """MBR like a Raspberry Pi balenaOS image: p1 FAT 'balena-boot', p2/p3 roots, p4 extended
    holding logical p5/p6; the boot partition is not the first one here, to prove the search."""
    _tools()
    with open(path, "wb") as f:
        f.truncate(128 * MiB)
    _run("sfdisk", "-q", str(path), stdin=(
        "label: dos\n"
        "start=2048, size=16384, type=83\n"
        "size=16384, type=83\n"
        "size=40960, type=c\n"
        "type=5\n"
        "size=8192, type=83\n"
        "type=83\n"))
    parts = json.loads(_run("sfdisk", "-J", str(path)))["partitiontable"]["partitions"]
    start, size = int(parts[2]["start"]), int(parts[2]["size"])
    _run("mkfs.fat", "-F", "16", "-n", "balena-boot", f"--offset={start}", str(path),
         str(size // 2))
    offset = start * 512
    (path.parent / "config.txt").write_text("[pi4]\narm_boost=1\n")
    _run("mcopy", "-i", f"{path}@@{offset}", str(path.parent / "config.txt"), "::config.txt")
    return offset


def mtype(image: Path, offset: int, name: str) -> str:
    return _run("mtype", "-i", f"{image}@@{offset}", f"::{name}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("HIL_CACHE_DIR", str(cache))
    return cache


def test_partition_tables_are_read(tmp_path: Path) -> None:
    gpt, mbr = tmp_path / "gpt.img", tmp_path / "mbr.img"
    make_gpt(gpt)
    boot_offset = make_mbr(mbr)
    kind, parts = read_partitions(gpt)
    assert kind == "gpt"
    assert [(p.number, p.name, p.fs_type, p.fs_label) for p in parts] == [
        (1, "resin-boot", "FAT16", "FLASHBOOT"), (2, "resin-rootA", "", "")]
    kind, parts = read_partitions(mbr)
    assert kind == "mbr"
    assert [p.number for p in parts] == [1, 2, 3, 5, 6]
    assert (parts[2].type, parts[2].fs_label, parts[2].start) == ("0x0c", "balena-boot",
                                                                  boot_offset)
    sizes = [p["size"] * 512 for p in json.loads(_run("sfdisk", "-J", str(mbr)))[
        "partitiontable"]["partitions"] if p["type"] != "5"]
    assert [p.size for p in parts] == sizes  # logical ones found through the EBR chain


@pytest.mark.parametrize("layout", ["gpt", "mbr"])
def test_config_json_lands_in_the_boot_partition(tmp_path: Path, layout: str) -> None:
    src = tmp_path / f"{layout}.img"
    offset = (make_gpt if layout == "gpt" else make_mbr)(src)
    before = src.read_bytes()
    wifi = b"[connection]\nid=wifi\ntype=wifi\n[wifi-security]\npsk=hunter22\n"
    out = configure_image(src, CONFIG, extra_files={"system-connections/wifi": wifi},
                          config_txt_lines=["enable_uart=1", "dtoverlay=disable-bt"],
                          out=tmp_path / "prepared.img")
    assert out == tmp_path / "prepared.img"
    assert json.loads(mtype(out, offset, "config.json")) == CONFIG
    assert mtype(out, offset, "system-connections/wifi").encode() == wifi
    config_txt = mtype(out, offset, "config.txt")
    if layout == "mbr":  # existing [pi4] section: our lines go under [all]
        assert config_txt.startswith("[pi4]\narm_boost=1\n")
        assert config_txt.endswith("[all]\nenable_uart=1\ndtoverlay=disable-bt\n")
    else:
        assert config_txt.endswith("enable_uart=1\ndtoverlay=disable-bt\n")
    assert src.read_bytes() == before  # the input is never modified
    assert out.stat().st_size == src.stat().st_size


def test_prepared_image_comes_with_its_own_bmap(tmp_path: Path) -> None:
    src = tmp_path / "gpt.img"
    make_gpt(src)
    out = configure_image(src, CONFIG)
    bmap = parse_bmap(bmap_path(out))
    assert bmap.image_size == out.stat().st_size
    target = tmp_path / "sd.img"
    flash(out, target, bmap=bmap, display=False)  # its checksums match the prepared content
    assert read_all(target, out.stat().st_size + 1) == out.read_bytes()


def test_rerun_is_a_cache_hit_that_does_no_work(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "gpt.img"
    make_gpt(src)
    first = configure_image(src, CONFIG, config_txt_lines=["enable_uart=1"])
    out = configure_image(src, CONFIG, config_txt_lines=["enable_uart=1"],
                          out=tmp_path / "o.img")

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not hash, copy or run mtools")

    monkeypatch.setattr(configure, "_sha256_file", no_work)
    monkeypatch.setattr(fat, "_run", no_work)
    monkeypatch.setattr(configure, "copy_sparse", no_work)
    assert configure_image(src, CONFIG, config_txt_lines=["enable_uart=1"]) == first
    assert configure_image(src, CONFIG, config_txt_lines=["enable_uart=1"],
                           out=tmp_path / "o.img") == out
    with pytest.raises(AssertionError, match="cache hit"):  # a different config is work
        configure_image(src, {**CONFIG, "hostname": "other"})


def test_compressed_input_is_decompressed_once(tmp_path: Path) -> None:
    src = tmp_path / "mbr.img"
    offset = make_mbr(src)
    zst = tmp_path / "mbr.img.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    a = configure_image(zst, CONFIG)
    b = configure_image(zst, {**CONFIG, "hostname": "second"})
    assert a != b
    assert json.loads(mtype(b, offset, "config.json"))["hostname"] == "second"
    bases = list((tmp_path / "cache" / "images").glob("base-*.img"))
    assert len(bases) == 1 and bases[0].stat().st_blocks * 512 < 16 * MiB  # sparse


def test_secrets_stay_out_of_logs_and_errors(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    src = tmp_path / "gpt.img"
    make_gpt(src)
    configure_image(src, CONFIG)
    assert "config.json" in caplog.text and REDACTED in caplog.text
    no_boot = tmp_path / "plain.img"
    with open(no_boot, "wb") as f:
        f.truncate(8 * MiB)
    _run("sfdisk", "-q", str(no_boot), stdin="label: dos\nstart=2048, type=83\n")
    with pytest.raises(ConfigError, match=r"no FAT partition named or labelled resin-boot or "
                       r"balena-boot.*found: MBR image with p1 type 0x83") as err:
        configure_image(no_boot, CONFIG)
    for secret in SECRETS:
        assert secret not in caplog.text
        assert secret not in str(err.value)


def test_extra_file_names_must_stay_inside(tmp_path: Path) -> None:
    src = tmp_path / "gpt.img"
    make_gpt(src)
    with pytest.raises(ConfigError, match="relative path"):
        configure_image(src, CONFIG, extra_files={"../escape": b"x"})


def test_redact() -> None:
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n-----END OPENSSH PRIVATE KEY-----"
    cfg = {**CONFIG, "registryToken": "tok-123456", "vpn": {"password": "pw-9999"},
           "notes": [pem], "deviceApiKeys": {"api.example": "K-77777"}}
    shown = redact(cfg)
    assert shown["apiKey"] == shown["deviceApiKey"] == shown["registryToken"] == REDACTED
    assert shown["vpn"]["password"] == shown["deviceApiKeys"] == REDACTED
    assert shown["notes"] == [REDACTED]
    assert shown["os"] == CONFIG["os"] and shown["uuid"] == CONFIG["uuid"]  # public stays
    text = redact_text(f"failed with {cfg['apiKey']} and K-77777 {pem}", secret_values(cfg))
    assert "SECRET" not in text and "K-77777" not in text and "b3BlbnNzaA" not in text


def make_plain(path: Path) -> Path:
    """A porter's image: one Linux partition, nothing balena about it."""
    _tools()
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    _run("sfdisk", "-q", str(path), stdin="label: dos\nstart=2048, type=83\n")
    return path


def test_an_image_without_a_boot_partition_is_named_as_the_user_gave_it(
        tmp_path: Path, private_cache: Path) -> None:
    raw = make_plain(tmp_path / "porter.img")
    packed = tmp_path / "porter.img.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(raw.read_bytes()))
    for image in (raw, packed):  # the compressed one is read from its copy in the cache
        with pytest.raises(ConfigError, match="no FAT partition named") as err:
            configure_image(image, CONFIG)
        assert str(err.value).startswith(f"{image}: "), str(err.value)
        assert str(private_cache) not in str(err.value)
        part, found = configure.boot_partition(image)
        assert part is None and found.startswith("MBR image with p1 type 0x83")
    make_gpt(tmp_path / "gpt.img")
    assert configure.boot_partition(tmp_path / "gpt.img")[0] is not None


def test_a_session_flashes_an_image_without_a_boot_partition_as_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from hil.config import load_rig
    from hil.session import HilSession, Options

    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    rig = load_rig(str(Path(__file__).resolve().parents[2] / "rigs" / "qemu-aarch64.yaml"))
    image = make_plain(tmp_path / "porter.img")
    session = HilSession(rig, Options(image=str(image)))
    assert session.prepare_image() == (image, None)  # the user's file itself, untouched
    assert session.as_is and session.as_is.startswith(f"image {image} flashed as it is")
    assert session.as_is in caplog.text
    # asking to configure it (a config.json) is an error naming the user's file
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"deviceType": "generic-aarch64"}))
    asked = HilSession(rig, Options(image=str(image), config_json=config_json))
    with pytest.raises(ConfigError, match="no FAT partition named") as err:
        asked.prepare_image()
    assert str(err.value).startswith(f"{image}: ") and asked.as_is is None
