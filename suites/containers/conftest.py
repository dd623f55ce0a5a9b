"""Fixtures of the containers suite: ``apps`` (the supervisor's local-mode API and the engine's
CLI on the device) and ``app``, the suite's app running (deployed once, kept between tests)."""

from __future__ import annotations

import pytest
from apps import Apps, release_service, target

from hil.os import HostOS


@pytest.fixture
def apps(host_os: HostOS, app_image: str) -> Apps:
    return Apps(host_os)


@pytest.fixture
def app(apps: Apps, app_image: str) -> dict[str, str]:
    """The suite's single-container app running: service name -> container ID."""
    return apps.deploy(target({"main": release_service(app_image)}))
