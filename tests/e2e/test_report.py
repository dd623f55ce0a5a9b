"""The reports people open, from one real session on a QEMU board (one boot): a test that
fails after printing hostile text on the console and running commands, and one that passes.
The ``--hil-report`` page is rendered by headless chromium and read back from its DOM; the
allure results directory written by the same session carries the same attachments."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.own_rig import run_on_own_rig

pytestmark = pytest.mark.qemu

REPORTED = r'''
def test_prints_and_fails(dut):
    # the console gets hostile text in colour; the failing command is the test's own
    dut.run("printf '\\033[1;31m<script>alert(1)</script> REPORT-MARK\\033[0m\\n' > /dev/console")
    result = dut.run("echo some output; (exit 3)")
    assert result.exit_code == 0, f"REPORT-FAILURE: exit {result.exit_code}"


def test_passes(dut):
    assert dut.run_check("uname -m").stdout.strip() == "aarch64"
'''


def rendered(page: Path) -> str:
    """The page's DOM as chromium built it (no network, no script needed to read it)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium (Debian's chromium package)")
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "</html>" in run.stdout, run.stderr[-3000:]
    return run.stdout


def test_html_page_and_allure_results_of_a_session_with_a_failure(tmp_path: Path) -> None:
    (tmp_path / "test_reported.py").write_text(REPORTED)
    pages, allure = tmp_path / "report", tmp_path / "allure"
    code, out = run_on_own_rig(tmp_path, [f"--hil-report={pages}", f"--alluredir={allure}",
                                          str(tmp_path / "test_reported.py")])
    assert code == 1 and "1 failed, 1 passed" in out, out[-6000:]
    [page] = list(pages.glob("*.html"))
    assert f"pytest-hil report: {page}" in out, out[-3000:]
    dom = rendered(page)

    # the failed test's block: outcome, error, console slice, commands, its boot (it started
    # the session)
    failed_block = re.search(r'<div class="test failed" id="t0">(.*?)</details></div>', dom,
                             re.S)
    assert failed_block, dom[:3000]
    block = failed_block.group(1)
    assert "REPORT-FAILURE: exit 3" in block
    console = re.search(r'<pre class="console">(.*?)</pre>', block, re.S)
    assert console, block[:3000]
    # the console's text, escaped and without its colour codes; no script element made of it
    assert "&lt;script&gt;alert(1)&lt;/script&gt; REPORT-MARK" in console.group(1), console.group(1)
    assert "\x1b" not in console.group(1) and "[1;31m" not in console.group(1)
    assert "<script" not in dom
    commands = re.findall(r'<tr class="cmd"><td>(\w+)</td><td>(.*?)</td>'
                          r'<td class="num">([\d.]+)</td><td[^>]*>(.*?)</td></tr>', block)
    assert ("console", "echo some output; (exit 3)") in [(c[0], c[1]) for c in commands], commands
    assert [c[3] for c in commands if c[1] == "echo some output; (exit 3)"] == ["3"], commands
    # the boot's timeline: an SVG with a bar per step, firmware to the OS's health signal
    svg = re.search(r'<svg[^>]*class="boot-timeline".*?</svg>', block, re.S)
    assert svg, block[:3000]
    steps = re.findall(r'<g class="boot-step" data-step="([^"]+)"><text[^>]*>[^<]*</text>'
                       r'<rect [^>]*width="([\d.]+)"', svg.group(0))
    names = [name for name, _ in steps]
    for name in ("firmware", "kernel", "shell", "services healthy"):
        assert name in names, names
    assert names.index("firmware") < names.index("kernel") < names.index("services healthy")
    # the flash and the power-on in its rig events, with the flash's throughput and check
    assert re.search(r'flash [^<]*</td><td class="num">[\d.]+ s</td><td>ok</td>'
                     r"<td>[^<]*MB/s, verified", block), block[:4000]
    assert '<div class="test passed" id="t1">' in dom

    # allure: the same attachments, the failed test's and the environment
    results = [json.loads(p.read_text()) for p in allure.glob("*-result.json")]
    [failed_result] = [r for r in results if r["name"] == "test_prints_and_fails"]
    assert failed_result["status"] == "failed"
    attached = {a["name"]: (allure / a["source"]).read_text()
                for a in failed_result["attachments"]}
    assert "REPORT-MARK" in attached["console"] and "\x1b" not in attached["console"]
    assert re.search(r"\s+3\s+console\s+echo some output; \(exit 3\)$", attached["commands"], re.M)
    timeline = attached["boot timeline 1"]
    assert timeline.startswith("<svg") and 'data-step="kernel"' in timeline
    assert [a["type"] for a in failed_result["attachments"]
            if a["name"] == "boot timeline 1"] == ["image/svg+xml"]
    env = (allure / "environment.properties").read_text()
    assert re.search(r"^rig=neg-", env, re.M) and "device.type=generic-aarch64" in env, env
    assert re.search(r"^os.version=.*\S", env, re.M), env
