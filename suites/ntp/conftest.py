"""Fixtures of the NTP suite: the rig host's NTP server and the device pointed at it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from ntp_device import (
    APPLY_TIMEOUT,
    POLL_EVERY,
    NtpRig,
    device_config,
    expected_ip,
    parse_sources,
    set_ntp_servers,
)

from hil.ntp import NtpServer
from hil.rig import Rig
from hil.session import HilSession


@pytest.fixture(scope="module")
def ntp_server(rig: Rig) -> Iterator[NtpServer]:
    """chronyd on the rig host, listening where the DUT reaches the host
    (``network.host_address``: 10.0.2.2 on QEMU is our loopback). ``HIL_NTP_PORT`` and
    ``HIL_NTP_LOCK_WAIT`` (seconds to wait for another session's server) override."""
    if rig.network is None:
        pytest.skip(f"rig {rig.name} has no network part: the DUT cannot reach an NTP server "
                    "on the rig host")
    server = NtpServer.for_host_address(
        rig.network.host_address,
        port=int(os.environ.get("HIL_NTP_PORT", "123")),
        lock_wait=float(os.environ.get("HIL_NTP_LOCK_WAIT", "600")),
        what=f"pytest-hil NTP suite, rig {rig.name}", rig=rig.name)
    with server:
        yield server


@pytest.fixture(scope="module")
def ntp(hil_session: HilSession, ntp_server: NtpServer, rig: Rig) -> Iterator[NtpRig]:
    """The device with ``ntpServers`` naming the rig host (written at runtime if the image's
    config.json lacks it, and put back afterwards). Tests take ``dut`` too: that fixture
    recovers the board after a failed test."""
    assert rig.network is not None and hil_session.dut is not None
    dut = hil_session.dut
    address = expected_ip(rig.network.host_address)
    original = device_config(dut).get("ntpServers")
    servers = str(original or "").split()
    changed = rig.network.host_address not in servers and address not in servers
    if changed:
        set_ntp_servers(dut, " ".join([*servers, rig.network.host_address]))
        last = [""]

        def listed() -> bool:
            last[0] = dut.run("chronyc -c -n sources").stdout
            return any(s.address == address for s in parse_sources(last[0]))

        dut.poll(listed, APPLY_TIMEOUT, "ntpServers written to config.json at runtime is "
                 f"applied (chrony lists {address})", lambda: last[0], interval=POLL_EVERY)
    try:
        yield NtpRig(dut, ntp_server, address)
    finally:
        # leave a server on true time behind, for whatever runs next on this device
        if ntp_server.offset:
            ntp_server.set_offset(0)
        ntp_server.start()
        if changed:
            set_ntp_servers(dut, None if original is None else str(original))
