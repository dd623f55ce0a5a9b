"""The image as it travels to a bench host: only its data crosses, and the bench host's writer
(the one writer, verify included) puts back exactly the image, zeros where it had none."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from hil.errors import InfraError
from hil.flash.bmap import create_bmap, write_bmap
from hil.flash.writer import flash
from hil.lab.imagestream import StreamedImage, send
from tests.flash.conftest import write_image

MiB = 1 << 20


def through(image: Path, bmap: Path | None, tmp_path: Path) -> tuple[bytes, StreamedImage]:
    wire = io.BytesIO()
    send(image, bmap, wire.write)
    return wire.getvalue(), StreamedImage(io.BytesIO(wire.getvalue()), "rig-a", tmp_path)


@pytest.mark.parametrize("fmt", ["raw", "raw+bmap", "gz"])
def test_the_image_arrives_whole_with_only_its_data_on_the_wire(tmp_path: Path,
                                                                fmt: str) -> None:
    raw = tmp_path / "disk.img"
    data = write_image(raw)
    image, bmap = raw, None
    if fmt == "raw+bmap":
        bmap = write_bmap(create_bmap(raw), tmp_path / "disk.img.bmap")
    elif fmt == "gz":
        image = tmp_path / "disk.img.gz"
        image.write_bytes(gzip.compress(data, compresslevel=1))
    (tmp_path / "bench").mkdir()
    wire, src = through(image, bmap, tmp_path / "bench")
    assert len(wire) < 21.5 * MiB  # the 40 MiB image holds 20.4 MiB of data
    assert (src.bmap is not None) == (bmap is not None)
    card = tmp_path / "card.img"
    card.write_bytes(b"\xa5" * len(data))  # an old image: the gaps must come back as zeros
    report = flash(src, card, bmap=src.bmap, zero_fill=True, display=False)
    assert report.verified
    assert card.read_bytes()[: len(data)] == data


def test_a_stream_cut_short_fails_and_says_where(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    write_image(raw)
    wire = io.BytesIO()
    send(raw, None, wire.write)
    cut = StreamedImage(io.BytesIO(wire.getvalue()[: 12 * MiB]), "rig-a", tmp_path)
    with pytest.raises(InfraError, match=r"rig-a:disk.img: the stream ended .* the sender "
                       r"stopped"):
        flash(cut, tmp_path / "card.img", display=False)
    with pytest.raises(InfraError, match="no header"):
        StreamedImage(io.BytesIO(b"\x00\x01garbage"), "rig-a", tmp_path)
