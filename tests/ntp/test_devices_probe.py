"""The devices suite's shell probes on the host's own /bin/sh (dash on Debian: stricter than
busybox ash), so they stay POSIX and run unchanged in a container's shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "suites" / "devices"))
import devices_probe as probe


def sh(script: str) -> str:
    run = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60)
    return run.stdout


def test_node_probe_tells_usable_missing_and_not_a_device(tmp_path: Path) -> None:
    found = probe.parse_nodes(sh(probe.node_script(
        ["/dev/null", "/dev/no-such-node", str(tmp_path), "/dev/watchdog-like"])))
    assert found["/dev/null"].ok and found["/dev/null"].state == "char"
    assert found["/dev/no-such-node"].state == "missing"
    assert found[str(tmp_path)].state == "notadevice"
    assert not found[str(tmp_path)].ok


def test_node_probe_reports_a_node_that_will_not_open(tmp_path: Path) -> None:
    node = tmp_path / "dead"
    # a character device with no driver behind it: exists, but opening fails (ENXIO/ENODEV)
    subprocess.run(["mknod", str(node), "c", "240", "250"], check=True)
    found = probe.parse_nodes(sh(probe.node_script([str(node)])))[str(node)]
    assert found.state == "char" and not found.ok
    assert "open" in found.detail


def test_chip_probe_without_gpio_reports_missing() -> None:
    chips = probe.parse_chips(sh(probe.chip_script(["gpiochip97"])))
    assert chips["gpiochip97"].state == "missing"


def test_parsers() -> None:
    chips = probe.parse_chips("CHIP gpiochip0 sysfs 8 9030000.pl061\nLINE gpiochip0 0 free in\n"
                              "LINE gpiochip0 3 used kernel\nCHIP gpiochip1 missing\n")
    assert chips["gpiochip0"].lines == 8 and chips["gpiochip0"].label == "9030000.pl061"
    assert chips["gpiochip0"].line_info == {0: "free in", 3: "used kernel"}
    assert chips["gpiochip1"].state == "missing"
    assert probe.parse_levels("SET c 1 1 1\nGET c 2 1\nSET c 1 0 0\n", "SET") == ["1", "0"]
    assert probe.parse_tagged("WD opened active timeout=30\nWD closed inactive\n", "WD") == {
        "opened": "active timeout=30", "closed": "inactive"}
    assert probe.split_line("gpiochip0:17") == ("gpiochip0", 17)
    with pytest.raises(ValueError):
        probe.split_line("gpiochip0")
