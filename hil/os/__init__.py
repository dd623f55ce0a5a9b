"""The host-OS adapter (``dut.os``): balenaOS's contract as the suites see it, for balenaOS and
for the project's reference OS. The interface is ``HostOS`` (hil/os/contract.py); its
implementation ``BalenaOS`` (hil/os/balena.py)."""

from hil.errors import OSContractError
from hil.os.balena import BREADCRUMBS, MARKERS, BalenaOS
from hil.os.contract import BootRecord, HostOS, RootPart, Roots, RunningUpdate, UpdateResult
from hil.os.hostdisk import HostDisk
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
    "HostDisk",
    "HostOS",
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
