"""The reference OS: a small balenaOS-compatible image the suites boot in QEMU.

``build()`` makes the disk image (cached, reproducible), ``configure()`` writes config.json
into an image file as balena's "os configure" does, ``RegistrationServer`` is the host side of
first-boot provisioning.
"""

from hil.refos.api import Registration, RegistrationServer
from hil.refos.builder import RefosBuildError, RefosImage, build
from hil.refos.image import boot_env, configure, read_boot_file, write_boot_file

__all__ = [
    "RefosBuildError",
    "RefosImage",
    "Registration",
    "RegistrationServer",
    "boot_env",
    "build",
    "configure",
    "read_boot_file",
    "write_boot_file",
]
