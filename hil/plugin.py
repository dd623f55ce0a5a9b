"""pytest plugin: ``--rig``, fixtures (``rig``, ``dut``), the ``needs`` marker, console slices in
each test's report, and rig faults reported apart from test failures."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from hil import allure_report, html_report, infra_report, record, redact
from hil.config import RigConfig, load_rig
from hil.console.log import EventKind, readable
from hil.dut import Dut
from hil.errors import ConfigError, HilError, InfraError, brief
from hil.rig import Rig
from hil.session import HilSession, Options

if TYPE_CHECKING:
    from hil.lab.plugin import PoolSession  # psycopg is imported only for --rig=pool:

CONSOLE_AT = pytest.StashKey[int]()  # item: console offset at the test's start
CALL_REPORT = pytest.StashKey[pytest.TestReport]()  # item: its call phase's report
SESSION = pytest.StashKey["HilSession | None"]()  # config
RIG_CONFIG = pytest.StashKey["RigConfig | None"]()  # config: --rig, loaded
LAB: pytest.StashKey[PoolSession | None] = pytest.StashKey()  # config: --rig=pool:
EXIT_STATUS = pytest.StashKey[int]()  # config: the session's, once it finished
ALLURE_MASK = pytest.StashKey[object | None]()  # config: masks what allure writes
UNMASK_LOGS = pytest.StashKey[Callable[[], None]]()  # config: ends the masking of log records
NEEDS_RECOVERY = pytest.StashKey[bool]()  # config: the last test failed or lost the shell
RECORDS = pytest.StashKey[list[record.TestRecord]]()  # config: each test's, for the reports
STARTED = pytest.StashKey[float]()  # config: time.time() at configure
OS_VERSION = pytest.StashKey[str]()  # config: the device's, read once the session is up
REPORT_PAGE = pytest.StashKey[Path]()  # config: the --hil-report page written
RECORD = pytest.StashKey[record.TestRecord]()  # item: its record
RECORD_FROM = pytest.StashKey[int]()  # item: console offset at its setup (0: it starts the rig)
log = logging.getLogger(__name__)
INFRA = ("hil", "infra")  # in a report's user_properties: the failure is a rig fault


def configured_rig(config: pytest.Config) -> RigConfig | None:
    """The rig the run was given (``--rig``), for collection-time hooks such as
    ``pytest_generate_tests`` that cannot use the ``rig_config`` fixture."""
    return config.stash.get(RIG_CONFIG, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware-in-the-loop (pytest-hil)")
    g.addoption("--rig", default=os.environ.get("HIL_RIG"),
                help="rig name (file in --rigs-dir or ./rigs) or path to a rig YAML "
                     "[env HIL_RIG]. Without it no hardware is touched.")
    g.addoption("--rigs-dir", default=None, help="extra directory of rig files")
    g.addoption("--image", default=None,
                help="OS image to flash (.img/.gz/.xz/.zst/.zip); 'refos' builds the reference "
                     "OS; default: the rig file's 'image:'")
    g.addoption("--bmap", default=None, help="block map for --image (default: IMAGE.bmap)")
    g.addoption("--config-json", default=None,
                help="config.json to put in the image (default: one made for the session)")
    g.addoption("--rig-wait", type=float, default=600.0,
                help="seconds to wait for a rig another session holds (0: fail at once)")
    g.addoption("--lab-db", default=None,
                help="the lab database's DSN, for --rig=pool:DEVICE_TYPE[,label=L] "
                     "[env HIL_LAB_DB]")
    g.addoption("--lab-priority", type=int, default=0,
                help="queue priority of this session's lease (higher first)")
    g.addoption("--lab-ttl", type=float, default=60.0,
                help="seconds a lab lease lives without renewal (renewed every third)")
    g.addoption("--lab-release", default=os.environ.get("HIL_LAB_RELEASE"),
                help="the release under test, kept with the lab's job records for "
                     "`hil lab matrix RELEASE` [env HIL_LAB_RELEASE]")
    g.addoption("--no-flash", action="store_true",
                help="boot what is on the board's storage now (skip image preparation and flash)")
    g.addoption("--hil-report", default=None, metavar="DIR",
                help="write one self-contained HTML page for the session into DIR: each "
                     "test's outcome, error, console, commands and boot timelines")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*features): run only on rigs that have all of these "
                            "features (e.g. gpio_loopback, sd_mux, rtc); skipped otherwise")
    config.stash[SESSION] = None
    config.stash[RIG_CONFIG] = None
    config.stash[NEEDS_RECOVERY] = False
    config.stash[LAB] = None
    config.stash[RECORDS] = []
    config.stash[STARTED] = time.time()
    config.stash[ALLURE_MASK] = allure_report.start(
        with_steps=bool(config.getoption("allure_report_dir", None)))
    config.stash[UNMASK_LOGS] = redact.mask_log_records()
    rig = config.getoption("--rig")
    if rig:
        try:
            config.stash[RIG_CONFIG] = _pool_rig(config, rig) if rig.startswith("pool:") \
                else load_rig(rig, config.getoption("--rigs-dir"))
        except (ConfigError, InfraError) as exc:  # InfraError: the lab, for pool:
            raise pytest.UsageError(f"--rig {rig}: {exc}") from None
        # CI cancels with SIGTERM: unwind like Ctrl-C so the rig ends powered off and unlocked.
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, _sigterm)


def _pool_rig(config: pytest.Config, rig: str) -> RigConfig | None:
    """Lease a rig from the lab; the pytest-xdist controller leases none (its workers do)."""
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return None
    from hil.lab.plugin import PoolSession

    lab = PoolSession.from_options(config, rig)
    cfg = lab.lease_one()
    config.stash[LAB] = lab
    return cfg


def _end_session(config: pytest.Config) -> bool:
    """Close the session (the rig powered off, its mux released through its drivers); returns
    whether it had reached the rig, so that the lab need not clean it again."""
    session, config.stash[SESSION] = config.stash.get(SESSION, None), None
    if session is None:
        return False
    session.close()
    return session.rig is not None


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def pytest_unconfigure(config: pytest.Config) -> None:
    allure_report.stop(config.stash.get(ALLURE_MASK, None))
    config.stash.get(UNMASK_LOGS, lambda: None)()
    powered_down = _end_session(config)
    lab = config.stash.get(LAB, None)
    if lab is not None:
        lab.give_back(config.stash.get(EXIT_STATUS, pytest.ExitCode.INTERRUPTED), powered_down)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rig_config(pytestconfig: pytest.Config) -> RigConfig:
    """The rig file ``--rig`` names, validated (``hil.config.RigConfig``); the tests that ask
    for a rig skip without ``--rig``."""
    cfg = pytestconfig.stash.get(RIG_CONFIG, None)
    if cfg is None:
        pytest.skip("needs a rig: run with --rig NAME (see `hil rigs`)")
    return cfg


@pytest.fixture(scope="session")
def hil_session(pytestconfig: pytest.Config, rig_config: RigConfig) -> Iterator[HilSession]:
    """The session on the rig: locked (or leased), flashed, booted to a shell; at its end the
    board is powered off, the mux released and the lock freed."""
    opt = pytestconfig.getoption
    lab = pytestconfig.stash.get(LAB, None)
    options = Options(image=opt("--image"), bmap=Path(opt("--bmap")) if opt("--bmap") else None,
                      config_json=Path(opt("--config-json")) if opt("--config-json") else None,
                      rig_wait=opt("--rig-wait"), flash=not opt("--no-flash"),
                      fence=lab.lease_lost if lab is not None else None)
    session = HilSession(rig_config, options)
    pytestconfig.stash[SESSION] = session
    session.start(what=f"pytest {' '.join(pytestconfig.invocation_params.args)}"[:200])
    if _reporting(pytestconfig):
        pytestconfig.stash[OS_VERSION] = _os_version(session)
    try:
        yield session
    finally:
        session.close()  # the object stays stashed for the terminal summary


def _reporting(config: pytest.Config) -> bool:
    return bool(config.getoption("--hil-report") or config.getoption("allure_report_dir", None))


def _os_version(session: HilSession) -> str:
    """The device's OS as its os-release names it, for the reports' headers."""
    assert session.dut is not None
    try:
        release = session.dut.os.os_release()
    except (HilError, AssertionError) as exc:
        return f"unknown (os-release unreadable: {brief(str(exc))})"
    return release.get("PRETTY_NAME") or release.get("VERSION") or "unknown (no PRETTY_NAME)"


@pytest.fixture(scope="session")
def rig(hil_session: HilSession) -> Rig:
    """The rig's parts (``hil.rig.Rig``): power, SD mux, storage, console log, network."""
    assert hil_session.rig is not None
    return hil_session.rig


@pytest.fixture
def dut(request: pytest.FixtureRequest, hil_session: HilSession) -> Iterator[Dut]:
    """The booted device. Kept up between tests; recovered (power-cycled if need be) only after
    a test that failed or left it without a shell."""
    d = hil_session.dut
    assert d is not None
    stash = request.config.stash
    if stash[NEEDS_RECOVERY] or not d.shell.ready:
        d.recover()
        stash[NEEDS_RECOVERY] = False
    d.console.skip_to(d.rig.log.end)  # a test's expect reads what happens in that test
    yield d
    rep = request.node.stash.get(CALL_REPORT, None)
    if rep is None or rep.failed:
        stash[NEEDS_RECOVERY] = True


# --- markers, report sections, infra errors -----------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, None, None]:
    # Each test's wall time, split like the session's, summed by suite (its directory).
    session = item.config.stash.get(SESSION, None)
    before = session.snapshot() if session is not None and session.ready else None
    yield
    session = item.config.stash.get(SESSION, None)
    if session is None or session.ready is None:
        return
    session.add_time(item.path.parent.name, before or session.ready, session.snapshot())


@pytest.hookimpl(tryfirst=True, specname="pytest_runtest_protocol")
def pytest_runtest_protocol_rerun(item: pytest.Item, nextitem: pytest.Item | None
                                  ) -> bool | None:
    """On a pool rig, a test whose rig faulted runs again on another rig of the pool (once a
    session, as the move itself): its first reports are logged as RERUN, so the verdict is the
    second rig's. pytest's own protocol otherwise."""
    lab = item.config.stash.get(LAB, None)
    if lab is None:
        return None
    from _pytest.runner import runtestprotocol

    hook = item.ihook
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(_is_infra(r) for r in reports) and lab.may_move():
        for report in reports:
            if _is_infra(report):
                # not "failed": pytest counts those for the exit status, and the verdict is
                # the next rig's (as pytest-rerunfailures logs a test it runs again)
                report.outcome = cast(Any, infra_report.RERUN)
            hook.pytest_runtest_logreport(report=report)
        first = item.stash.get(RECORD, None)
        if first is not None:  # the reports list both runs: the first as it went, then this
            first.outcome = infra_report.RERUN
            del item.stash[RECORD]
        item._initrequest()  # type: ignore[attr-defined]  # a fresh request for the new run
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        hook.pytest_runtest_logreport(report=report)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _is_infra(report: pytest.TestReport | pytest.CollectReport) -> bool:
    # a collection error's report has no user_properties; tuple(): a report that crossed a
    # process boundary (pytest-xdist) holds lists
    props = getattr(report, "user_properties", ())
    return report.failed and any(tuple(prop) == INFRA for prop in props)


@pytest.hookimpl(tryfirst=True)  # before the fixtures: a move to another rig resets them
def pytest_runtest_setup(item: pytest.Item) -> None:
    lab = item.config.stash.get(LAB, None)
    if lab is not None:  # may move the session to another rig, or stop the test (INFRA)
        moved = lab.before_test(item, lambda: _end_session(item.config))
        if moved is not None:
            item.config.stash[RIG_CONFIG] = moved
    cfg = item.config.stash.get(RIG_CONFIG, None)
    for mark in item.iter_markers("needs"):
        missing = [f for f in mark.args if cfg is None or not cfg.has(f)]
        if cfg is not None and missing:
            pytest.skip(f"rig {cfg.name} lacks {', '.join(missing)}")
    session = item.config.stash.get(SESSION, None)
    item.stash[RECORD_FROM] = 0  # the session starts in this test's setup: its boot included
    if session is not None and session.rig is not None:
        item.stash[CONSOLE_AT] = item.stash[RECORD_FROM] = session.rig.log.end
        session.rig.log.note(EventKind.TEST, item.nodeid)


# trylast: the innermost wrapper, so report writers that read the report in their own
# wrappers (allure's) see it with its secrets masked
@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    where = None
    if call.excinfo is not None and call.excinfo.errisinstance(InfraError):
        # a new list: pytest hands every phase's report the item's own list
        cfg = item.config.stash.get(RIG_CONFIG, None)
        where = infra_report.where(call.excinfo.value, cfg.name if cfg else "")
        report.user_properties = [*report.user_properties, INFRA, (infra_report.AT, where)]
    lab = item.config.stash.get(LAB, None)
    if lab is not None:
        lab.reported(report, item.path.parent.name, where)
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    if report.longrepr is not None and not isinstance(report.longrepr, tuple):
        text = str(report.longrepr)
        clean = redact.text(text)
        if clean != text:  # keep pytest's structured repr unless a secret had to go
            report.longrepr = clean
    # captured output and logs too: a test may print what it read from the device
    report.sections = [(name, redact.text(content)) for name, content in report.sections]
    session = item.config.stash.get(SESSION, None)
    _record(item, report, session)
    if session is None or session.rig is None:
        return
    start = item.stash.get(CONSOLE_AT, None)
    if start is None and report.when == "setup":  # the session started in this test's setup
        if report.failed:
            start = 0  # and its start failed: its whole console led to it
        else:
            item.stash[CONSOLE_AT] = session.rig.log.end  # the test's own console starts now
    if start is None:
        return
    if report.when == "call" or (report.when == "setup" and report.failed):
        text = redact.text(readable(session.rig.log.text(start)))
        report.sections.append(("Captured console", text[-50000:] or "(no console output)"))
        allure_report.attach_console(text)
        if item.config.getoption("--hil-report"):  # allure has it as an attachment already
            item.stash[RECORD].console = text[-50000:]


def _record(item: pytest.Item, report: pytest.TestReport, session: HilSession | None) -> None:
    """Keep what the test did for the reports, once: its outcome and error as its phases end;
    its commands, rig events and boots when its run ends (the call, or a setup that did not
    pass)."""
    rec = item.stash.get(RECORD, None)
    if rec is None:
        rec = item.stash[RECORD] = record.TestRecord(item.nodeid, "passed")
        item.config.stash[RECORDS].append(rec)
    rec.seconds += report.duration
    if report.failed:
        infra = any(tuple(prop) == INFRA for prop in report.user_properties)
        rec.outcome = "infra" if infra else "failed" if report.when == "call" else "error"
        rec.error = "\n\n".join(filter(None, (rec.error, record.clean(report.longreprtext))))
    elif report.skipped:
        rec.outcome = "skipped"
        longrepr = report.longrepr
        rec.error = record.clean(str(longrepr[2] if isinstance(longrepr, tuple) else longrepr))
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    if session is not None and session.rig is not None:
        rig = session.rig
        record.of_span(rec, rig.log, rig.timeline, item.stash.get(RECORD_FROM, 0), rig.log.end)
    allure_report.attach_record(rec)


def pytest_report_teststatus(report: pytest.TestReport,
                             config: pytest.Config) -> tuple[str, str, Any] | None:
    if report.outcome == infra_report.RERUN:
        return "rerun", "R", ("RERUN", {"yellow": True})
    if _is_infra(report):
        return "infra", "I", ("INFRA", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    # rig faults, those whose test ran again on another rig included
    infra = [*terminalreporter.stats.get("rerun", []), *terminalreporter.stats.get("infra", [])]
    if infra and not getattr(terminalreporter, "no_summary", False):
        infra_report.sections(terminalreporter, config, infra)
        infra_report.in_short_summary(terminalreporter, infra)
    lab = config.stash.get(LAB, None)
    if lab is not None and lab.notes:
        terminalreporter.section("pytest-hil lab")
        for note in lab.notes:
            terminalreporter.line(note)
    session = config.stash.get(SESSION, None)
    if session is not None:
        terminalreporter.section("pytest-hil rig")
        for line in session.report_lines():
            terminalreporter.line(line)
    page = config.stash.get(REPORT_PAGE, None)
    if page is not None:
        terminalreporter.line(f"pytest-hil report: {page}")


def _session_info(config: pytest.Config) -> record.SessionInfo:
    cfg = config.stash.get(RIG_CONFIG, None)
    if cfg is None:
        return record.SessionInfo("(no rig)", "-", "-", "-")
    image = "(as on the board: --no-flash)" if config.getoption("--no-flash") else \
        str(config.getoption("--image") or cfg.image or "-")
    return record.SessionInfo(cfg.name, cfg.device_type.slug, image,
                              config.stash.get(OS_VERSION, "unknown (the device never came up)"))


def _write_reports(config: pytest.Config) -> None:
    worker = getattr(config, "workerinput", {}).get("workerid", "")
    if not worker and config.getoption("numprocesses", None):
        return  # pytest-xdist's controller: its workers ran the sessions, and report them
    info = _session_info(config)
    allure_dir = config.getoption("allure_report_dir", None)
    if allure_dir:
        allure_report.write_environment(Path(allure_dir), info)
    folder = config.getoption("--hil-report")
    if folder:
        tests: list[record.TestRecord] = config.stash[RECORDS]
        config.stash[REPORT_PAGE] = html_report.write(
            Path(folder), info, tests, time.time() - config.stash[STARTED], worker)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Infra errors are failures for the exit code: a green run must mean the rig worked too.
    session.config.stash[EXIT_STATUS] = exitstatus
    _write_reports(session.config)
    if session.config.stash.get(RIG_CONFIG, None) is None:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and tr.stats.get("infra") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
