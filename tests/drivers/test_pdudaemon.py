"""The pdudaemon driver against pdudaemon itself (its HTTP listener and localcmdline driver)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.emu.pdu import PduDaemonRunner
from hil.errors import InfraError
from hil.power.pdudaemon import PduDaemon, PduDaemonSettings
from hil.qemu.target import free_port
from hil.registry import PartContext


@pytest.fixture(scope="module")
def pdud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PduDaemonRunner, Path]]:
    tmp = tmp_path_factory.mktemp("pdud")
    record = tmp / "switches.txt"
    runner = PduDaemonRunner(tmp, {
        "bench-pdu": {"cmd_on": f"echo on %s >> {record}", "cmd_off": f"echo off %s >> {record}"},
        "stuck-pdu": {"cmd_on": "sleep 20", "cmd_off": "sleep 20"},
    }, port=free_port()).start()
    yield runner, record
    runner.stop()


def pdu(ctx: PartContext, url: str, **kw: object) -> PduDaemon:
    return PduDaemon(PduDaemonSettings.model_validate({"url": url, **kw}), ctx)


def test_switches_through_pdudaemon(pdud: tuple[PduDaemonRunner, Path],
                                    ctx: PartContext) -> None:
    runner, record = pdud
    p = pdu(ctx, runner.url, hostname="bench-pdu", port=3)
    p.on()
    p.off()
    assert record.read_text().split("\n")[:2] == ["on 3", "off 3"]
    assert p.is_on() is None  # pdudaemon cannot report


def test_unknown_pdu_is_refused(pdud: tuple[PduDaemonRunner, Path], ctx: PartContext) -> None:
    runner, _ = pdud
    with pytest.raises(InfraError, match=r"refused on.*HTTP 500"):
        pdu(ctx, runner.url, hostname="no-such-pdu", port=1).on()


def test_pdu_that_times_out(pdud: tuple[PduDaemonRunner, Path], ctx: PartContext) -> None:
    runner, _ = pdud
    p = pdu(ctx, runner.url, hostname="stuck-pdu", port=1, timeout=1)
    t0 = time.monotonic()
    with pytest.raises(InfraError) as err:
        p.off()
    assert time.monotonic() - t0 < 2.5
    text = str(err.value)
    assert "[rig bench1 power]" in text
    assert "did not answer off for stuck-pdu outlet 1 within 1.0s" in text


def test_unreachable_pdudaemon(ctx: PartContext) -> None:
    t0 = time.monotonic()
    with pytest.raises(InfraError, match="unreachable"):
        pdu(ctx, f"http://127.0.0.1:{free_port()}", hostname="x", port=1, timeout=2).off()
    assert time.monotonic() - t0 < 2


def test_settings() -> None:
    with pytest.raises(ValueError):
        PduDaemonSettings.model_validate({"hostname": "x"})
    with pytest.raises(ValueError):
        PduDaemonSettings.model_validate({"alias": "a", "hostname": "x"})
    assert PduDaemonSettings.model_validate({"alias": "dut1"}).alias == "dut1"
