"""Host OS update images for the suites: what ``--update-image`` names on a real device, or
reference OS images built for the session (one build per version, shared by every test)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hil.errors import ConfigError

log = logging.getLogger(__name__)

Kind = Literal["rootfs", "hostapp", "ref"]
# The versions the reference OS's own tests build too, so the cache serves both.
REFOS_GOOD = ("2.0.0", "1.0.0")
REFOS_BROKEN = {"init": "2.0.0-broken-init", "health": "2.0.0-broken-health"}


@dataclass(frozen=True)
class UpdateImage:
    """One new OS for ``hostapp-update``.

    ``rootfs``: an ext4 root filesystem image (the reference OS installs it into the inactive
    root partition). ``hostapp``: a balenaOS hostapp bundle file (a container image tarball).
    ``ref``: a container image reference the device pulls itself (``hostapp-update -i``).
    ``broken`` names what is wrong with it on purpose ("init", "health") or is None."""

    kind: Kind
    source: str
    version: str | None = None
    broken: str | None = None

    @property
    def path(self) -> Path:
        if self.kind == "ref":
            raise ValueError(f"{self.source} is an image reference, not a file")
        return Path(self.source)

    def describe(self) -> str:
        what = f"{self.kind} {Path(self.source).name if self.kind != 'ref' else self.source}"
        if self.version:
            what += f" (VERSION {self.version})"
        if self.broken:
            what += f" [broken: {self.broken}]"
        return what

    @classmethod
    def from_option(cls, value: str, broken: str | None = None) -> UpdateImage:
        """``--update-image``: an ext4 rootfs image, a hostapp bundle (tar), or an image
        reference such as ``registry.example/balena-os:2.115.0``."""
        path = Path(value).expanduser()
        if not path.exists():
            if not value.startswith(("/", ".", "~")) and (":" in value or "/" in value):
                return cls("ref", value, None, broken)
            raise ConfigError(f"update image {value} not found", key="--update-image")
        with path.open("rb") as f:
            head = f.read(2048)
        if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
            from hil.os.transfer import rootfs_version

            return cls("rootfs", str(path), rootfs_version(path), broken)
        if len(head) >= 262 and head[257:262] == b"ustar":
            return cls("hostapp", str(path), None, broken)
        raise ConfigError(f"{path}: neither an ext4 root filesystem image nor a hostapp "
                          "bundle (tar)", key="--update-image")


class UpdateSet:
    """The update images a session's suites use. On the reference OS every image is built on
    first use (cached across sessions by its inputs); elsewhere the good one comes from
    ``--update-image`` and broken ones from their options, or the tests that need them skip."""

    def __init__(self, *, refos_arch: str | None, given: UpdateImage | None = None,
                 given_broken: dict[str, UpdateImage] | None = None) -> None:
        self.refos_arch = refos_arch
        self.given = given
        self.given_broken = dict(given_broken or {})
        self._built: dict[tuple[str, str | None], UpdateImage] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, *, refos_arch: str | None, update_image: str | None,
                     broken: dict[str, str | None]) -> UpdateSet:
        """``refos_arch``: the reference OS build the device runs (None: not the reference
        OS); the others as the suites' ``--update-image*`` options give them."""
        given = UpdateImage.from_option(update_image) if update_image else None
        given_broken = {k: UpdateImage.from_option(v, broken=k) for k, v in broken.items() if v}
        return cls(refos_arch=refos_arch, given=given, given_broken=given_broken)

    def _refos(self, version: str, broken: str | None = None) -> UpdateImage:
        from hil.refos import build

        assert self.refos_arch is not None
        with self._lock:
            key = (version, broken)
            if key not in self._built:
                img = build(self.refos_arch, version, broken=broken)
                self._built[key] = UpdateImage("rootfs", str(img.rootfs), img.version, broken)
            return self._built[key]

    def good(self, running_version: str | None = None) -> UpdateImage | None:
        """A good update, preferably one whose VERSION differs from ``running_version`` (so
        the switch shows in os-release too). None if the session has none."""
        if self.given is not None:
            return self.given
        if self.refos_arch is None:
            return None
        for version in REFOS_GOOD:
            if version != running_version:
                return self._refos(version)
        return self._refos(REFOS_GOOD[0])

    def broken(self, kind: str) -> UpdateImage | None:
        if kind in self.given_broken:
            return self.given_broken[kind]
        if self.refos_arch is None:
            return None
        return self._refos(REFOS_BROKEN[kind], broken=kind)

    def missing_reason(self, what: str) -> str:
        if what == "good":
            return ("no update image: give --update-image (a hostapp bundle, an image reference "
                    "or an ext4 rootfs), or run the reference OS (--image refos)")
        return (f"no update image broken on purpose ({what}): give "
                f"--update-image-broken-{what}, or run the reference OS (--image refos)")
