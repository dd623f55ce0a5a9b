"""FAT filesystems inside a disk image file, reached at their partition's byte offset with
mtools (``mcopy -i img@@offset``): no mount, no loop device, no root.

With ``epoch`` the bytes depend only on the inputs (fixed file and directory times in UTC,
``mkfs.fat --invariant``), so a built image is reproducible; without it files get the time of
writing, as a copy would.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from hil.errors import DeadlineError, InfraError
from hil.flash.partitions import Partition
from hil.redact import redact_text

MTOOLS_TIMEOUT = 60.0
SECTOR = 512


def _env(epoch: int | None) -> dict[str, str]:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    if epoch is not None:
        env.update(SOURCE_DATE_EPOCH=str(epoch), TZ="UTC", MTOOLS_NO_VFAT="0")
    return env


def _run(cmd: Sequence[str], image: Path, part: Partition, *, epoch: int | None = None,
         secrets: Sequence[str] = (), check: bool = True, shown: Sequence[str] = ()
         ) -> subprocess.CompletedProcess[bytes]:
    try:
        result = subprocess.run(list(cmd), env=_env(epoch), capture_output=True,
                                timeout=MTOOLS_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise DeadlineError(f"{cmd[0]} on {image}", "no exit", MTOOLS_TIMEOUT) from exc
    except FileNotFoundError as exc:
        raise InfraError(f"{cmd[0]} not found: install mtools and dosfstools",
                         part="flash") from exc
    if check and result.returncode != 0:
        err = result.stderr.decode(errors="replace").strip()[-800:]
        raise InfraError(redact_text(f"{' '.join(shown or cmd)} on {image} (partition "
                                     f"{part.number}) failed ({result.returncode}): {err}",
                                     list(secrets)), part="flash")
    return result


def _mtools(tool: str, args: Sequence[str], image: Path, part: Partition, *,
            epoch: int | None = None, secrets: Sequence[str] = (),
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return _run([tool, "-i", f"{image}@@{part.start}", *args], image, part, epoch=epoch,
                secrets=secrets, check=check, shown=[tool, *args])


def make_fat(image: Path, part: Partition, *, label: str, volume_id: str) -> None:
    """A FAT16 filesystem filling ``part`` of ``image``, the same bytes for the same label and
    volume id (an 8-digit hex serial)."""
    _run(["mkfs.fat", "-F", "16", "-n", label, "-i", volume_id, "--invariant",
          f"--offset={part.start // SECTOR}", str(image), str(part.size // 1024)], image, part)


def write_files(image: Path, part: Partition, files: Mapping[str, bytes], *,
                epoch: int | None = None, secrets: Sequence[str] = (),
                scratch: Path | None = None) -> None:
    """Create or replace ``files`` (path relative to the filesystem's root -> content) on the
    FAT in ``part``, making directories as needed. ``secrets`` are masked in errors; the
    contents pass through private files in ``scratch`` (default: the system's temp dir)."""
    made: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="hil-fat-", dir=scratch) as tmp:
        for i, (name, data) in enumerate(sorted(files.items())):
            path = PurePosixPath(name.strip("/"))
            for parent in reversed(path.parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    if _mtools("mdir", ["-b", f"::/{parent}"], image, part,
                               check=False).returncode != 0:
                        _mtools("mmd", [f"::/{parent}"], image, part, epoch=epoch,
                                secrets=secrets)
            local = Path(tmp) / str(i)
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:  # may hold secrets: private to us, then gone
                f.write(data)
            if epoch is not None:
                os.utime(local, (epoch, epoch))
            # -m: the file's time is the local copy's (now, or the epoch)
            _mtools("mcopy", ["-o", "-m", str(local), f"::/{path}"], image, part, epoch=epoch,
                    secrets=secrets)


def read_file(image: Path, part: Partition, name: str) -> bytes | None:
    """A file from the FAT in ``part``, or None if it does not exist."""
    got = _mtools("mtype", [f"::/{name.strip('/')}"], image, part, check=False)
    return got.stdout if got.returncode == 0 else None
