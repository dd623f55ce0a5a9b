"""Host OS update images for the suites: what ``--update-image`` names on a real device, or
reference OS images built for the session (one build per version, shared by every test)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hil.errors import ConfigError

if TYPE_CHECKING:
    from hil.appregistry import AppRegistry
    from hil.refos import RefosImage

log = logging.getLogger(__name__)

Kind = Literal["rootfs", "hostapp", "ref"]
# The versions the reference OS's own tests build too, so the cache serves both.
REFOS_GOOD = ("2.0.0", "1.0.0")


@dataclass(frozen=True)
class UpdateImage:
    """One new OS for ``hostapp-update``.

    ``rootfs``: an ext4 root filesystem image (the reference OS installs it into the inactive
    root partition). ``hostapp``: a balenaOS hostapp bundle file (a container image tarball).
    ``ref``: a container image reference the device pulls itself (``hostapp-update -i``).
    The rollback tests break a good update in place once installed (``HostOS.break_update``),
    so no image is broken on purpose."""

    kind: Kind
    source: str
    version: str | None = None

    @property
    def path(self) -> Path:
        if self.kind == "ref":
            raise ValueError(f"{self.source} is an image reference, not a file")
        return Path(self.source)

    def describe(self) -> str:
        what = f"{self.kind} {Path(self.source).name if self.kind != 'ref' else self.source}"
        if self.version:
            what += f" (VERSION {self.version})"
        return what

    @classmethod
    def from_option(cls, value: str) -> UpdateImage:
        """``--update-image``: an ext4 rootfs image, a hostapp bundle (tar), or an image
        reference such as ``registry.example/balena-os:2.115.0``."""
        path = Path(value).expanduser()
        if not path.exists():
            if not value.startswith(("/", ".", "~")) and (":" in value or "/" in value):
                return cls("ref", value)
            raise ConfigError(f"update image {value} not found", key="--update-image")
        with path.open("rb") as f:
            head = f.read(2048)
        if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
            from hil.os.transfer import rootfs_version

            return cls("rootfs", str(path), rootfs_version(path))
        if len(head) >= 262 and head[257:262] == b"ustar":
            return cls("hostapp", str(path))
        raise ConfigError(f"{path}: neither an ext4 root filesystem image nor a hostapp "
                          "bundle (tar)", key="--update-image")


class UpdateSet:
    """The update image a session's suites use: ``--update-image``, or on the reference OS one
    built on first use (cached across sessions by its inputs); else the tests that need one
    skip. Every rollback test starts from this one good image too (broken in place)."""

    def __init__(self, *, refos_arch: str | None, given: UpdateImage | None = None) -> None:
        """``refos_arch``: the reference OS build the device runs (None: not the reference
        OS)."""
        self.refos_arch = refos_arch
        self.given = given
        self._built: dict[str, UpdateImage] = {}
        self._images: dict[str, RefosImage] = {}
        self._lock = threading.Lock()

    def _refos(self, version: str) -> UpdateImage:
        from hil.refos import build

        assert self.refos_arch is not None
        with self._lock:
            if version not in self._built:
                img = build(self.refos_arch, version)
                self._images[version] = img
                self._built[version] = UpdateImage("rootfs", str(img.rootfs), img.version)
            return self._built[version]

    def from_registry(self, image: UpdateImage, registry: AppRegistry | None) -> UpdateImage:
        """``image`` as a hostapp image in ``registry``, for ``hostapp-update -i``, where it
        is a reference OS build and the device can pull from the registry; else ``image``."""
        version = next((v for v, b in self._built.items() if b == image), None)
        if registry is None or version is None:
            return image
        from hil.refos.hostapp import NAME, hostapp_archive

        ref = registry.push(hostapp_archive(self._images[version]), f"{NAME}:{version}")
        return UpdateImage("ref", ref, version)

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

    @staticmethod
    def missing_reason() -> str:
        return ("no update image: give --update-image (a hostapp bundle, an image reference "
                "or an ext4 rootfs), or run the reference OS (--image refos)")
