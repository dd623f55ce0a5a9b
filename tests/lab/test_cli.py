"""``hil lab ...`` as an operator uses it, on a rig whose power is a command (no hardware)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.cli import main
from hil.lab import leases
from hil.lab.db import Connection
from hil.lab.leases import Selector
from tests.lab.helpers import add_rigs, rig_row


def bench_rig(folder: Path, name: str = "pi-1") -> tuple[Path, Path]:
    """A rig file whose power switch writes to a file, and that file."""
    power = folder / f"{name}.power"
    rig = folder / f"{name}.yaml"
    rig.write_text(f"""description: a Raspberry Pi 3 whose supply is switched by a command
device_type: raspberrypi3
power:
  driver: command
  on: "echo on >> {power}"
  off: "echo off >> {power}"
console:
  driver: serial
  url: "loop://"
""")
    return rig, power


def hil(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_init_register_status_release_history_maintenance(
        lab: Connection, lab_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_LAB_DB", lab_dsn)
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    assert hil(capsys, "lab", "init") == (0, "lab database at schema version 3 (up to date)\n")
    rig, power = bench_rig(tmp_path)
    code, out = hil(capsys, "lab", "register", "--host", "bench1", "--label", "fast-sd", str(rig))
    assert (code, out) == (0, "pi-1: raspberrypi3 on bench1\n")
    row = rig_row(lab, "pi-1")
    assert row["health"] == "unknown" and "fast-sd" in row["labels"] and "power" in row["labels"]
    check = leases.acquire(lab_dsn, Selector("raspberrypi3", ("fast-sd",)), purpose="health",
                           holder="ci job 7", ttl=10)
    code, out = hil(capsys, "lab", "status")
    assert code == 0 and "pi-1" in out and "leased" in out and "ci job 7" in out
    code, out = hil(capsys, "lab", "release", "pi-1", "--epoch", "5")
    assert code == 3 and "epoch 5 refused" in out and "held by ci job 7" in out
    code, out = hil(capsys, "lab", "release", "pi-1", "--epoch", "1")
    assert code == 0 and "released" in out
    check.stop_heartbeat()
    # the bench host cleans it through the rig's own power driver
    assert hil(capsys, "lab", "host", "bench1", "--once")[0] == 0
    assert set(power.read_text().split()) == {"off"}  # never switched on
    row = rig_row(lab, "pi-1")
    assert (row["state"], row["health"]) == ("idle", "unknown")
    code, out = hil(capsys, "lab", "maintenance", "pi-1")
    assert (code, out) == (0, "pi-1: unknown -> maintenance\n")
    code, out = hil(capsys, "lab", "history", "pi-1")
    assert code == 0 and "epoch 1 health by ci job 7: passed" in out
    assert "unknown -> maintenance: maintenance set by hand" in out


def test_a_health_check_runs_on_the_rig_and_sets_its_health(
        lab: Connection, lab_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_LAB_DB", lab_dsn)
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    rig, power = bench_rig(tmp_path)
    assert hil(capsys, "lab", "register", "--host", "bench1", str(rig))[0] == 0
    code, out = hil(capsys, "lab", "check", "pi-1", "--", "sh", "-c",
                    'grep -q "driver: command" "$HIL_RIG"')
    assert (code, out) == (0, "pi-1: health check passed: good\n")
    assert rig_row(lab, "pi-1")["health"] == "good"
    assert hil(capsys, "lab", "check", "pi-1", "--", "false") == (
        1, "pi-1: health check failed: bad\n")
    row = rig_row(lab, "pi-1")
    assert (row["health"], row["state"]) == ("bad", "idle")
    assert set(power.read_text().split()) == {"off"}  # cleaned after each check
    code, out = hil(capsys, "lab", "check", "pi-1", "--wait", "0.2", "--", "true")
    assert code == 3 and "no 1 rig(s) matching raspberrypi3,rig=pi-1" in out  # bad: never


def test_a_broken_rig_file_is_refused_naming_file_and_key(
        lab_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rig = tmp_path / "bad.yaml"
    rig.write_text("device_type: raspberrypi3\npower: {driver: nosuch}\n")
    code, out = hil(capsys, "lab", "register", "--db", lab_dsn, "--host", "b", str(rig))
    assert code == 2 and f"{rig}:2: power.driver: unknown driver 'nosuch'" in out


def test_no_database_given_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIL_LAB_DB", raising=False)
    code, out = hil(capsys, "lab", "status")
    assert code == 3 and "no lab database given: pass --db DSN or set HIL_LAB_DB" in out


def test_the_release_matrix_from_the_job_records(
        lab: Connection, lab_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    add_rigs(lab, ["pi-1", "pi-2"])
    add_rigs(lab, ["nuc-1"], device_type="intel-nuc")
    runs = [("raspberrypi3", "v2", {"smoke": "passed", "ntp": "infra"}),
            ("raspberrypi3", "v2", {"smoke": "passed", "ntp": "passed"}),
            ("intel-nuc", "v2", {"smoke": "failed"}),
            ("intel-nuc", "v1", {"smoke": "passed"})]
    for device_type, release, suites in runs:
        lease = leases.acquire(lab_dsn, Selector(device_type), ttl=10)
        lease.release("passed", leases.JobRecord(release, suites))
        for g in lease.grants:
            leases.clean(lab, g, lambda g: None)
    code, out = hil(capsys, "lab", "matrix", "--db", lab_dsn, "v2")
    assert (code, out.splitlines()) == (0, [
        "release v2: jobs by device type and suite",
        "device_type   ntp                smoke",
        "intel-nuc                        1 failed",
        "raspberrypi3  1 passed, 1 infra  2 passed"])
    assert hil(capsys, "lab", "matrix", "--db", lab_dsn, "v3") == (
        1, "no job records for release 'v3' (sessions name it with --lab-release)\n")
