"""The tutorial (docs/first-suite.md) works as printed: its module, taken from the page, passes
on a QEMU board with the reference OS."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.own_rig import REPO, run_on_own_rig

pytestmark = pytest.mark.qemu
PAGE = REPO / "docs" / "first-suite.md"


def tutorial_module() -> str:
    """The page's first Python block: the module it tells the reader to save."""
    block = re.search(r"^```python\n(.*?)^```$", PAGE.read_text(), re.S | re.M)
    assert block, f"{PAGE} has no ```python block"
    return block.group(1)


def test_the_tutorials_module_passes_as_printed(tmp_path: Path) -> None:
    module = tmp_path / "test_first.py"
    module.write_text(tutorial_module())
    tests = re.findall(r"^def (test_\w+)", module.read_text(), re.M)
    assert len(tests) == 3, tests
    code, out = run_on_own_rig(tmp_path, [str(module)])
    assert code == 0 and "3 passed" in out, out[-6000:]
    for name in tests:
        assert f"test_first.py::{name} PASSED" in out, out[-6000:]
