"""How the terminal shows a rig fault (an ``INFRA`` report): as pytest shows a failure, in a
section of its own, and with a line in pytest's short test summary naming the rig and the part.
"""

from __future__ import annotations

from typing import Any

import pytest

from hil import redact
from hil.errors import InfraError, brief

AT = "hil_infra"  # a rig fault's user property: the rig, the part and the error's first line
RERUN = "rerun"  # the outcome of a rig fault's report whose test ran again on another pool rig
# what pytest's short summary lists for a report character, to know whether it wrote its header
_SUMMARY_STATS = {"f": "failed", "E": "error", "p": "passed", "s": "skipped", "x": "xfailed",
                  "X": "xpassed"}


def where(exc: BaseException, rig: str) -> str:
    """Where a rig fault happened and what it was, in one line: the rig, the part, the
    error's first line."""
    assert isinstance(exc, InfraError)
    return (f"rig {exc.rig or rig or '?'}, {exc.part or 'part unknown'}: "
            f"{redact.text(brief(exc.message))}")


def line(report: pytest.TestReport) -> str:
    # tuple(): a report that crossed a process boundary (pytest-xdist) holds lists
    at = next((str(p[1]) for p in report.user_properties if tuple(p)[:1] == (AT,)), "")
    again = " (run again on another rig)" if report.outcome == RERUN else ""
    return f"INFRA {report.nodeid}{_phase(report)} - {at}{again}"


def _phase(report: pytest.TestReport) -> str:
    return "" if report.when == "call" else f" (at {report.when})"


def sections(tr: Any, config: pytest.Config, reports: list[pytest.TestReport]) -> None:
    """Each rig fault as pytest shows a failure: the traceback with the whole error (and the
    console tail in it), then the report's sections (the console slice, captured output)."""
    tr.section("INFRA: rig (infrastructure) errors — not test failures", yellow=True)
    if config.option.tbstyle == "no":
        for rep in reports:
            tr.line(line(rep))
        return
    tw = config.get_terminal_writer()
    show = config.option.showcapture
    for rep in reports:
        tw.sep("_", f"INFRA {rep.head_line or rep.nodeid}{_phase(rep)}", yellow=True, bold=True)
        rep.toterminal(tw)
        for name, content in rep.sections if show != "no" else ():
            if show == "all" or show in name:
                tw.sep("-", name)
                tw.line(content.rstrip("\n"))


def in_short_summary(tr: Any, reports: list[pytest.TestReport]) -> None:
    """One line per rig fault at the end of pytest's short test summary, where failures and
    errors are listed (``-r`` with f, E, a or A; pytest's default shows them): pytest lists
    only outcomes it knows, so its method is wrapped for this run."""
    if not {"f", "E"} & set(tr.reportchars):
        return
    original = tr.short_test_summary

    def short_test_summary() -> None:
        original()
        if not any(tr.stats.get(_SUMMARY_STATS[c]) for c in tr.reportchars
                   if c in _SUMMARY_STATS):
            tr.write_sep("=", "short test summary info", cyan=True, bold=True)
        for rep in reports:
            tr.write_line(line(rep), yellow=True)

    tr.short_test_summary = short_test_summary
