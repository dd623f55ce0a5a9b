from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hil.config import RigConfig, load_rig
from tests.emu.helpers import RigMaker
from tests.emu.minios import MiniOs, build


@pytest.fixture(scope="session")
def mini_os() -> MiniOs:
    return build()


@pytest.fixture
def make_rig(tmp_path: Path, mini_os: MiniOs) -> RigMaker:
    """Write a rig file whose emulated board boots the mini OS, and load it."""
    def make(body: str, name: str = "vbench") -> RigConfig:
        text = textwrap.dedent(body).format(kernel=mini_os.kernel, initrd=mini_os.initrd,
                                            append=mini_os.append)
        path = tmp_path / "rigs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return load_rig(str(path))
    return make
