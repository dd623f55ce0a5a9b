"""`hil discover`: real devices of this host, and the rig-file snippets it suggests (which must
validate as the drivers' settings)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from hil import discover
from hil.cli import main
from hil.mux.virtual import VirtualMux, VirtualMuxSettings
from hil.registry import PartContext, lookup


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_lists_a_card_on_the_host_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = PartContext(rig="bench1", part="sd_mux", runtime=tmp_path, device_type=None)
    mux = VirtualMux(VirtualMuxSettings(image=Path("disco-card.img"), size=2**20), ctx)
    mux.to_host()
    try:
        found = discover.collect()
        (card,) = [b for b in found["block"] if b["node"] == str(mux.host_device())]
        assert card["size"] == 2**20
        assert card["match"] == {"ATTR{loop/backing_file}": "*/disco-card.img"}
        assert main(["discover"]) == 0
        assert '"ATTR{loop/backing_file}": "*/disco-card.img"' in capsys.readouterr().out
        assert main(["discover", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["block"]
    finally:
        mux.off()


SAMPLE: dict[str, list[dict[str, Any]]] = {
    "serial": [{"node": "/dev/ttyUSB0", "links": [], "vid": "0403", "pid": "6001",
                "serial": "A10KBZ3Q", "vendor": "FTDI", "product": "FT232R", "usb_path": "1-1.2",
                "driver": "ftdi_sio", "match": {"ATTRS{serial}": "A10KBZ3Q"}}],
    "block": [{"node": "/dev/sda", "size": 31 * 2**30, "removable": True, "model": "sdmux",
               "links": [], "match": {"ATTRS{serial}": "000000000042"}}],
    "hid_relays": [{"node": "/dev/hidraw0", "protocol": "dcttech", "vid": "16c0",
                    "pid": "05df", "serial": "QAAMZ", "product": "USBRelay2",
                    "energised": [], "vendor": "www.dcttech.com", "usb_path": "1-1.3"}],
    "sd_muxes": [{"kind": "usbsdmux", "node": "/dev/sg0", "vid": "0424", "pid": "4041",
                  "serial": "000000000042", "vendor": "", "product": "", "usb_path": "1-1.4",
                  "match": {"ATTRS{serial}": "000000000042"}},
                 {"kind": "sdwire", "vid": "04e8", "pid": "6001", "serial": "sd-wire_11",
                  "vendor": "SRPOL", "product": "sd-wire", "usb_path": "1-1.5"}],
    "gpio": [{"node": "/dev/gpiochip0", "label": "pinctrl-bcm2835", "lines": 54}],
}


def test_suggestions_are_valid_rig_settings() -> None:
    text = discover.render(SAMPLE)
    snippets = [line.strip() for line in text.splitlines() if line.startswith("    ")]
    assert len(snippets) == 5
    for snippet in snippets:
        part, _, body = snippet.partition(": ")
        raw = yaml.safe_load(body)
        cls = lookup(part, raw.pop("driver"))
        assert cls is not None
        cls.Settings.model_validate(raw)
    assert "/dev/gpiochip0  pinctrl-bcm2835 54 lines" in text
