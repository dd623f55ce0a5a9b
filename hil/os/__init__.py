"""The host-OS adapter (``dut.os``): balenaOS's contract as the suites see it, for balenaOS and
for the project's reference OS. See ``hil/os/balena.py``."""

from hil.os.balena import (
    BREADCRUMBS,
    MARKERS,
    BalenaOS,
    BootRecord,
    OSContractError,
    RootPart,
    Roots,
    RunningUpdate,
    UpdateResult,
)
from hil.os.parse import BootLine, BootState, Mount
from hil.os.secret import Secret
from hil.os.updates import UpdateImage, UpdateSet

__all__ = [
    "BREADCRUMBS",
    "MARKERS",
    "BalenaOS",
    "BootLine",
    "BootRecord",
    "BootState",
    "Mount",
    "OSContractError",
    "RootPart",
    "Roots",
    "RunningUpdate",
    "Secret",
    "UpdateImage",
    "UpdateResult",
    "UpdateSet",
]
