"""The ``hil flash`` and ``hil image`` commands, as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hil.cli import main
from hil.flash.bmap import create_bmap, write_bmap

from .conftest import ImageFixture, Loops, read_all
from .test_configure import CONFIG, SECRETS, make_gpt, mtype


def test_flash_command(image: ImageFixture, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sd.img"
    assert main(["flash", str(image.variants["xz"]), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and "MB/s" in printed
    assert read_all(out, image.size + 1) == image.data


def test_flash_finds_the_bmap_next_to_the_image(image: ImageFixture, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "disk.img.zst"
    shutil.copy(image.variants["zst"], src)
    write_bmap(create_bmap(image.raw), tmp_path / "disk.img.bmap")  # bmaptool's convention
    caplog.set_level("INFO")
    assert main(["flash", str(src), str(tmp_path / "sd.img"), "--no-progress"]) == 0
    assert "using block map" in caplog.text


def test_refused_target_exit_code_and_message(image: ImageFixture, loops: Loops,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    dev = loops.make(48 << 20)
    assert main(["flash", str(image.raw), dev, "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert f"refusing to write {dev}" in err and "--allow-fixed" in err
    assert main(["flash", str(image.raw), dev, "--no-progress", "--allow-fixed"]) == 0


def test_image_configure_and_bmap_commands(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "gpt.img"
    offset = make_gpt(src)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "ready.img"
    assert main(["image", "configure", str(src), "--config", str(cfg), "-o", str(out),
                 "--config-txt", "enable_uart=1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert json.loads(mtype(out, offset, "config.json")) == CONFIG
    assert not any(s in captured.out + captured.err for s in SECRETS)
    assert main(["image", "bmap", str(out)]) == 0
    assert (tmp_path / "ready.img.bmap").is_file()
    assert "MiB mapped" in capsys.readouterr().out
    assert main(["image", "configure", str(src), "--config", str(tmp_path / "nope.json")]) == 2


def test_flash_command_starts_without_the_other_subsystems(tmp_path: Path) -> None:
    # `hil flash` must not pay for pydantic, the rig config and every driver at each start
    code = ("import sys; from hil.cli import main; "
            f"rc = main(['flash', {str(tmp_path / 'none.img')!r}, 'x.img', '--no-progress']); "
            "print(rc, sorted(m for m in sys.modules if m.startswith(('hil.', 'pydantic')) "
            "and not m.startswith('hil.flash')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split(" ", 1)
    assert out == ["3", "['hil.cli', 'hil.errors']\n"]
