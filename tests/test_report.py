"""The report's record and rendering on a real ConsoleLog: boot steps timed from the console's
arrival times, commands recorded as they ran, and hostile text (markup, escapes, a secret) in
every field escaped or masked on the HTML page, in the SVG and in allure's files."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from hil import allure_report, html_report, record, redact, timeline_svg
from hil.console.log import CommandRun, ConsoleLog, EventKind
from hil.rig import Step

pytest_plugins = ["pytester"]

SECRET = "sekrit-0123456789abcdef"
HOSTILE = f'<script>alert("x")</script> & </pre></svg> \x1b[31mred\x1b[0m apiKey={SECRET}'
SHOWN = '<script>alert("x")</script> & </pre></svg> red apiKey=<redacted>'  # as a reader sees it


@pytest.fixture(autouse=True)
def _secret() -> None:
    redact.register(SECRET)


def booted_log() -> ConsoleLog:
    """A console that saw a power-on and a reference OS boot, a few milliseconds apart."""
    log = ConsoleLog()
    log.note(EventKind.POWER_ON)
    for line in (b"U-Boot 2023.01\r\n", b"HIL-BOOT: root=2 resin_root_part=2 bootcount=1 "
                 b"upgrade_available=0\r\n", b"Starting kernel ...\r\n",
                 b"HIL-INIT: root=/dev/vda2\r\n", b"HIL-READY 1.0.0 host\r\n",
                 b"\x1eRabc123\x1f\r\n"):
        time.sleep(0.02)  # apart by more than the log's time resolution
        log.append(line)
    return log


def test_boot_steps_come_in_order_timed_from_the_console() -> None:
    log = booted_log()
    [boot] = record.boots(log, 0, log.end)
    assert boot.origin == "power on"
    assert [s.name for s in boot.steps] == ["firmware", "bootloader chose a root", "kernel",
                                            "init", "services healthy", "shell"]
    ats = [s.at for s in boot.steps]
    assert ats == sorted(ats) and ats[0] >= 0.015 and ats[-1] >= 0.1, ats
    assert sum(s.took for s in boot.steps) == pytest.approx(boot.seconds)


def test_a_panic_starts_the_next_boot() -> None:
    log = booted_log()
    log.append(b"Kernel panic - not syncing: Attempted to kill init!\r\n")
    time.sleep(0.02)
    log.append(b"U-Boot 2023.01\r\nStarting kernel ...\r\n")
    first, second = record.boots(log, 0, log.end)
    assert len(first.steps) == 6 and second.origin == "panic"
    assert [s.name for s in second.steps] == ["firmware", "kernel"]


def test_no_boot_without_a_start_in_the_span() -> None:
    log = booted_log()
    assert record.boots(log, 1, log.end) == []  # the power-on was before the span


def test_commands_are_recorded_with_exit_codes_and_errors_masked() -> None:
    log = ConsoleLog()
    with log.command("console", f"(\necho {SECRET}\n)") as run:
        run.exit_code = 3
    with pytest.raises(TimeoutError), log.command("ssh", "sleep 99"):
        raise TimeoutError("no end of 'sleep 99'")
    cmds = record.commands(log, 0, log.end + 1)
    assert [(c.transport, c.command, c.exit_code) for c in cmds] == [
        ("console", "echo <redacted>", 3), ("ssh", "sleep 99", None)]
    assert cmds[1].error == "no end of 'sleep 99'"
    assert record.exit_text(cmds[1]) == "- (no end of 'sleep 99')"


def hostile_record() -> record.TestRecord:
    boot = record.Boot("power on", (record.BootStep(HOSTILE, 1.0, 1.0),
                                    record.BootStep("kernel", 3.5, 2.5)))
    rec = record.TestRecord(f"test_x[{HOSTILE}]", "failed", 2.0, record.clean(HOSTILE),
                            record.clean(HOSTILE))
    rec.commands = [CommandRun("console", record.clean(HOSTILE), 0, 0.0, 0.5, 1)]
    rec.events = [record.RigEvent("flash", "flash", 1.0, True, record.clean(HOSTILE))]
    rec.boots = [boot]
    return rec


def test_svg_is_well_formed_with_a_bar_per_step_and_its_text_escaped() -> None:
    svg = timeline_svg.render(hostile_record().boots[0])
    root = ET.fromstring(svg)  # well-formed XML, markup in a name stayed text
    ns = "{http://www.w3.org/2000/svg}"
    steps = root.findall(f"{ns}g")
    assert [g.get("data-step") for g in steps] == [SHOWN, "kernel"]
    assert [g.find(f"{ns}text").text for g in steps] == [SHOWN, "kernel"]  # type: ignore
    widths = [float(g.find(f"{ns}rect").get("width")) for g in steps]  # type: ignore
    assert widths[1] == pytest.approx(2.5 * widths[0], rel=0.01)  # bars to scale
    assert "2.50 s (at 3.50 s)" in svg
    assert not root.findall(f".//{ns}script")


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_page_escapes_and_masks_everything() -> None:
    info = record.SessionInfo(f"rig{HOSTILE}", "generic-aarch64", "img", HOSTILE)
    page = html_report.render(info, [hostile_record()], 3.0)
    parsed = Elements()
    parsed.feed(page)
    assert "script" not in parsed.tags  # the hostile markup stayed text
    assert SECRET not in page and "&lt;redacted&gt;" in page
    assert "\x1b" not in page and "[31m" not in page
    text = "".join(parsed.text)
    assert text.count(SHOWN) >= 6  # rig, OS version, name, error, command, console, ...
    assert parsed.tags.count("svg") == 1 and parsed.tags.count("pre") == 2  # error, console


def test_allure_files_mask_and_the_environment_is_one_line_per_key(tmp_path: Path) -> None:
    info = record.SessionInfo("qemu-aarch64", "generic-aarch64", "a=b:c.img",
                              f"OS 1.0\n{HOSTILE}")
    allure_report.write_environment(tmp_path, info)
    env = (tmp_path / "environment.properties").read_text().splitlines()
    assert env[:3] == ["rig=qemu-aarch64", "device.type=generic-aarch64",
                       "image=a\\=b\\:c.img"]
    assert len(env) == 4 and env[3].startswith("os.version=OS 1.0 <script>")
    assert SECRET not in env[3] and "\x1b" not in env[3]
    lines = record.command_lines(hostile_record())
    assert SECRET not in lines and "     1  console" in lines
    assert json.dumps(lines)  # text, attachable as it is


def test_rig_events_of_a_span_in_order() -> None:
    log = booted_log()
    steps = [Step("power on", "power", 0.2, True, at=0),
             Step("flash x", "flash", 1.0, False, f"boom {SECRET}", at=5),
             Step("later", "power", 0.1, True, at=log.end + 10)]
    events = record.rig_events(log, steps, 0, log.end)
    assert [(e.name, e.ok, e.text) for e in events] == [
        ("power on", True, ""), ("flash x", False, "boom <redacted>")]


STEPPED = '''
import pytest
from hil.config import load_rig
from hil.rig import Rig


def test_steps(tmp_path):
    rig = Rig(load_rig(RIG_FILE))
    try:
        rig.power_on()
        with rig.log.command("console", "(\\necho APIKEY\\n)") as run:
            run.exit_code = 0
        with pytest.raises(TimeoutError), rig.log.command("ssh", "sleep 99"):
            raise TimeoutError("no end of 'sleep 99'")
    finally:
        rig.close()
'''


def test_rig_steps_and_commands_are_allure_steps_as_they_run(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    """With --alluredir, each rig step and device command is an allure step while it runs:
    named, in order, failed where it raised, its secret masked."""
    pytest.importorskip("allure")
    power = tmp_path / "power"
    rig = tmp_path / "pi.yaml"
    rig.write_text(f"device_type: raspberrypi3\npower: {{driver: command, on: 'echo on >> "
                   f"{power}', off: 'echo off >> {power}'}}\nconsole: {{driver: serial, "
                   "url: 'loop://'}\n")
    pytester.makepyfile(STEPPED.replace("RIG_FILE", repr(str(rig))).replace("APIKEY", SECRET))
    pytester.makeconftest(f"from hil import redact\nredact.register({SECRET!r})\n")
    allure = tmp_path / "allure"
    result = pytester.runpytest_subprocess(f"--alluredir={allure}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    [res] = [json.loads(p.read_text()) for p in allure.glob("*-result.json")]
    got = [(s["name"], s["status"]) for s in res["steps"]]
    assert got == [("power on", "passed"), ("console: echo <redacted>", "passed"),
                   ("ssh: sleep 99", "broken")], got
    assert SECRET not in json.dumps(res)
