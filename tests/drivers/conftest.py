from __future__ import annotations

from pathlib import Path

import pytest

from hil.registry import PartContext


@pytest.fixture
def ctx(tmp_path: Path) -> PartContext:
    return PartContext(rig="bench1", part="power", runtime=tmp_path, device_type=None)
