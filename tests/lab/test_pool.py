"""``pytest --rig=pool:...`` end to end, in child pytest runs against registered rigs whose power
is a command (no board boots): leased for the session, given back as the session leaves it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.lab import leases
from hil.lab.db import Connection
from hil.lab.leases import Selector
from hil.lab.rigs import register
from tests.lab.helpers import rig_row
from tests.lab.test_cli import bench_rig

pytest_plugins = ["pytester"]

TESTS = """
import os
from pathlib import Path

def test_runs_on_the_leased_rig(rig_config):
    assert rig_config.device_type.slug == "raspberrypi3"
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    Path(os.environ["SEEN_DIR"], worker).write_text(rig_config.name)
"""


@pytest.fixture
def pool(lab: Connection, lab_dsn: str, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Two good rigs registered on bench1; returns their power logs."""
    monkeypatch.setenv("HIL_LAB_DB", lab_dsn)
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("SEEN_DIR", str(tmp_path))
    monkeypatch.delenv("HIL_RIG", raising=False)
    files = [bench_rig(tmp_path, f"pi-{i}") for i in (1, 2)]
    register(lab, "bench1", [str(rig) for rig, _ in files])
    lab.execute("UPDATE rigs SET health = 'good'")
    lab.commit()
    return [power for _, power in files]


def jobs(lab: Connection) -> list[dict[str, object]]:
    rows = lab.execute("SELECT rig, holder, outcome FROM jobs ORDER BY id").fetchall()
    lab.commit()
    return rows


def test_a_session_leases_a_rig_and_gives_it_back_powered_off(
        pytester: pytest.Pytester, pool: list[Path], lab: Connection, tmp_path: Path) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("--rig=pool:raspberrypi3", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    rig = (tmp_path / "main").read_text()
    assert [(j["rig"], j["outcome"]) for j in jobs(lab)] == [(rig, "passed")]
    row = rig_row(lab, rig)
    assert (row["state"], row["health"], row["epoch"]) == ("idle", "good", 1)
    assert set((tmp_path / f"{rig}.power").read_text().split()) == {"off"}  # cleaned


def test_an_infra_error_gives_the_rig_back_as_unknown(
        pytester: pytest.Pytester, pool: list[Path], lab: Connection) -> None:
    pytester.makepyfile("""
        from hil.errors import InfraError

        def test_relay_fails(rig_config):
            raise InfraError("relay did not answer", part="power", rig=rig_config.name)
    """)
    result = pytester.runpytest_subprocess("--rig=pool:raspberrypi3,label=power")
    # run again on the other rig, where it faults too: both rigs go back as unknown
    assert result.parseoutcomes() == {"rerun": 1, "infra": 1}, result.outlines[-5:]
    assert [job["outcome"] for job in jobs(lab)] == ["infra", "infra"]
    assert {rig_row(lab, str(job["rig"]))["health"] for job in jobs(lab)} == {"unknown"}


def test_after_an_infra_error_the_session_continues_once_on_another_rig(
        pytester: pytest.Pytester, pool: list[Path], lab: Connection, tmp_path: Path) -> None:
    pytester.makepyfile(test_moves="""
        import os
        from pathlib import Path
        from hil.errors import InfraError

        def seen(rig_config, name):
            Path(os.environ["SEEN_DIR"], name).write_text(rig_config.name)

        def test_a_relay_fails(rig_config):
            if not Path(os.environ["SEEN_DIR"], "first").exists():
                seen(rig_config, "first")
                raise InfraError("relay did not answer", part="power", rig=rig_config.name)
            seen(rig_config, "rerun")  # run again, on the other rig

        def test_b_runs_on_another_rig(rig_config):
            seen(rig_config, "second")

        def test_c_fails_there_too(rig_config):
            raise InfraError("relay did not answer", part="power", rig=rig_config.name)

        def test_d_stays(rig_config):
            seen(rig_config, "third")
    """)
    result = pytester.runpytest_subprocess("--rig=pool:raspberrypi3", "--lab-release=v1.2",
                                           "-p", "no:cacheprovider",
                                           f"--hil-report={tmp_path / 'report'}")
    # the faulted test ran again on the other rig and passed there; a second fault stays one
    assert result.parseoutcomes() == {"passed": 3, "rerun": 1, "infra": 1}, result.outlines[-5:]
    first, rerun, second, third = ((tmp_path / n).read_text()
                                   for n in ("first", "rerun", "second", "third"))
    assert first != second and rerun == second and third == second  # one move
    result.stdout.fnmatch_lines([f"INFRA test_moves.py::test_a_relay_fails - rig {first}, "
                                 "power: relay did not answer (run again on another rig)"])
    # the session's page lists both runs: the first as a rerun with its error, then the pass
    [page] = (tmp_path / "report").glob("*.html")
    runs = re.findall(r'<div class="test (\w+)" id="t\d+"><details[^>]*><summary>'
                      r'<span class="outcome">\w+</span> test_moves.py::test_a_relay_fails',
                      page.read_text())
    assert runs == ["rerun", "passed"], runs
    result.stdout.fnmatch_lines([f"*rig {first} gave an infrastructure error *relay did not "
                                 f"answer*the session continued on {second}*"])
    suite = pytester.path.name
    rows = lab.execute("SELECT rig, outcome, release, suites FROM jobs ORDER BY id").fetchall()
    assert [(r["rig"], r["outcome"], r["release"], r["suites"]) for r in rows] == [
        (first, "infra", "v1.2", {suite: "infra"}), (second, "infra", "v1.2", {suite: "infra"})]
    assert {rig_row(lab, r)["health"] for r in (first, second)} == {"unknown"}
    assert all(rig_row(lab, r)["state"] == "idle" for r in (first, second))


def test_each_xdist_worker_leases_its_own_rig(
        pytester: pytest.Pytester, pool: list[Path], lab: Connection, tmp_path: Path) -> None:
    pytester.makepyfile(TESTS.replace("def test_runs", "def test_a_runs") + TESTS.replace(
        "def test_runs", "def test_b_runs").split("from pathlib import Path", 1)[1])
    result = pytester.runpytest_subprocess("--rig=pool:raspberrypi3", "-n", "2",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    done = jobs(lab)
    assert sorted(str(j["rig"]) for j in done) == ["pi-1", "pi-2"]
    assert sorted(str(j["holder"]).split()[-1] for j in done) == ["gw0", "gw1"]
    seen = {p.name: p.read_text() for p in tmp_path.glob("gw*")}
    assert len(set(seen.values())) == len(seen)  # no two workers on one rig


def test_no_free_rig_in_time_names_the_queue_and_the_holder(
        pytester: pytest.Pytester, pool: list[Path], lab_dsn: str) -> None:
    held = [leases.acquire(lab_dsn, Selector("raspberrypi3"), holder=f"nightly {i}", ttl=30)
            for i in (1, 2)]
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("--rig=pool:raspberrypi3", "--rig-wait=0.5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no 1 rig(s) matching raspberrypi3 free within 0.5s: queue "
                                 "position 1; matching rigs: pi-1 held by nightly 1*"])
    for lease in held:
        lease.stop_heartbeat()


def test_ctrl_c_gives_the_rig_back(pytester: pytest.Pytester, pool: list[Path],
                                   lab: Connection, tmp_path: Path) -> None:
    started = tmp_path / "started"
    test = pytester.makepyfile(f"""
        import time
        from pathlib import Path

        def test_long(rig_config):
            Path({str(started)!r}).write_text(rig_config.name)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             "--rig=pool:raspberrypi3", str(test)], cwd=pytester.path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    try:
        wait_until(lambda: started.exists() or proc.poll() is not None, 30,
                   "the child pytest to start its test")
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
    rig = started.read_text()
    assert rig_row(lab, rig)["state"] == "idle"
    assert [(j["rig"], j["outcome"]) for j in jobs(lab)] == [(rig, "failed")]


def test_a_kicked_session_stops_touching_the_rig(
        pytester: pytest.Pytester, pool: list[Path], lab: Connection) -> None:
    pytester.makepyfile("""
        import os
        from hil.deadline import wait_until
        from hil.lab import db, leases

        def test_kicked_by_an_operator(pytestconfig, rig_config):
            with db.connect(os.environ["HIL_LAB_DB"]) as conn:
                epoch = conn.execute("SELECT epoch FROM rigs WHERE name = %s",
                                     (rig_config.name,)).fetchone()["epoch"]
                leases.release(conn, rig_config.name, epoch, by="an operator")
            lease = pytestconfig.stash[__import__("hil.plugin").plugin.LAB].lease
            wait_until(lambda: lease.lost, 5, "the heartbeat to find the lease gone")

        def test_after_the_kick(rig_config):
            raise AssertionError("must not run on a rig it no longer holds")
    """)
    result = pytester.runpytest_subprocess("--rig=pool:raspberrypi3", "--lab-ttl=0.6", "-rA")
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("infra")) == (1, 1)
    result.stdout.fnmatch_lines(["*test_after_the_kick*lease epoch 1 is over*"])
    assert "must not run" not in result.stdout.str()
    [job] = jobs(lab)
    assert job["outcome"] == "passed"  # the operator's release; the session's own is refused
