"""``--hil-report=DIR``: one self-contained HTML page per session (inline CSS and SVG, no
script, nothing fetched): the session's rig, image, device type, OS version and totals, then a
row per test with its outcome, error, console slice, commands, rig events and boot timelines.
Every text goes through ``record.markup`` (masked, readable, escaped): the console's output
is the device's, not ours. (Masking the finished page instead would put a raw ``<redacted>``
into it.)"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from hil import timeline_svg
from hil.record import SessionInfo, TestRecord, exit_text, failed, markup

STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
.summary td{border-bottom:1px solid #ddd}
.test{border:1px solid #ccc;border-left-width:8px;margin:8px 0;padding:4px 8px}
.passed{border-left-color:#59a14f}.failed,.error{border-left-color:#e15759}
.infra,.rerun{border-left-color:#edc948}.skipped{border-left-color:#bab0ac}
.outcome{font-weight:bold;text-transform:uppercase}
pre{background:#f6f6f6;padding:6px;overflow-x:auto;white-space:pre-wrap;max-height:40em}
.cmds td{font-family:monospace;border-bottom:1px solid #eee}.bad{color:#c00}.num{white-space:nowrap}
"""
OUTCOMES = ("passed", "failed", "error", "infra", "skipped")


def render(info: SessionInfo, tests: Sequence[TestRecord], seconds: float) -> str:
    counts = Counter(t.outcome for t in tests)
    totals = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o]) or "no tests"
    head = [("rig", info.rig), ("device type", info.device_type), ("image", info.image),
            ("OS version", info.os_version), ("tests", totals), ("time", f"{seconds:.1f} s")]
    body = [f"<h1>pytest-hil: {markup(info.rig)}</h1>", '<table class="session">']
    body += [f"<tr><th>{markup(k)}</th><td>{markup(v)}</td></tr>" for k, v in head]
    body.append('</table><h2>Tests</h2><table class="summary">')
    body += [f'<tr class="{t.outcome}"><td class="outcome">{t.outcome}</td>'
             f'<td><a href="#t{i}">{markup(t.nodeid)}</a></td><td>{t.seconds:.1f} s</td></tr>'
             for i, t in enumerate(tests)]
    body.append("</table>")
    body += [_test(i, t) for i, t in enumerate(tests)]
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>pytest-hil {markup(info.rig)}: {markup(totals)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    return page


def _test(i: int, t: TestRecord) -> str:
    shown = " open" if t.outcome in ("failed", "error", "infra", "rerun") else ""
    out = [f'<div class="test {t.outcome}" id="t{i}"><details{shown}><summary>'
           f'<span class="outcome">{t.outcome}</span> {markup(t.nodeid)} '
           f"({t.seconds:.1f} s)</summary>"]
    if t.error:
        out.append(f'<h4>Error</h4><pre class="error-text">{markup(t.error)}</pre>')
    if t.commands:
        out.append('<h4>Commands</h4><table class="cmds"><tr><th>via</th><th>command</th>'
                   "<th>seconds</th><th>exit</th></tr>")
        out += [f'<tr class="cmd"><td>{c.transport}</td><td>{markup(c.command)}</td>'
                f"<td class=num>{c.seconds:.3f}</td>"
                f'<td{" class=bad" if failed(c) else ""}>{markup(exit_text(c))}</td></tr>'
                for c in t.commands]
        out.append("</table>")
    if t.events:
        out.append('<h4>Rig</h4><table class="cmds">')
        out += [f'<tr class="rig-event"><td>{markup(e.part)}</td><td>{markup(e.name)}</td>'
                f"<td class=num>{e.seconds:.2f} s</td>"
                f'<td{"" if e.ok else " class=bad"}>{"ok" if e.ok else "failed"}</td>'
                f"<td>{markup(e.text)}</td></tr>" for e in t.events]
        out.append("</table>")
    for boot in t.boots:
        out.append(f"<h4>Boot</h4>{timeline_svg.render(boot)}")
    if t.console:
        out.append(f'<h4>Console</h4><pre class="console">{markup(t.console)}</pre>')
    out.append("</details></div>")
    return "".join(out)


def write(folder: Path, info: SessionInfo, tests: Sequence[TestRecord], seconds: float,
          worker: str = "") -> Path:
    """The page, as ``folder/<rig>-<date>-<time>[-<worker>].html`` (``worker``: a pytest-xdist
    worker's id, each writing its own); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{worker}" if worker else "")
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', info.rig)}-{stamp}.html"
    path.write_text(render(info, tests, seconds), encoding="utf-8")
    return path
