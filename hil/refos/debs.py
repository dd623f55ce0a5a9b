"""Debian packages for the image: resolve versions, download once, extract once, and work out
which shared libraries a binary needs (so the image carries only what its binaries load)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.cache import cache_dir
from hil.errors import HilError

log = logging.getLogger(__name__)


class PackageError(HilError):
    """A Debian package could not be resolved, downloaded or unpacked."""


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str  # Debian architecture of the download (arm64, amd64, all)

    @property
    def filename(self) -> str:
        # apt-get download quotes the epoch colon
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _run(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise PackageError(f"{argv[0]} not found: install it (apt-get)") from exc
    if proc.returncode != 0:
        raise PackageError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-800:]}")
    return proc.stdout


def _apt_stamp() -> str:
    """Changes whenever apt's view of the archive can change (apt-get update, preferences)."""
    stamps = []
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/preferences.d"),
              Path("/etc/apt/sources.list.d")):
        if d.is_dir():
            stamps.append(max([d.stat().st_mtime_ns,
                               *(p.stat().st_mtime_ns for p in d.iterdir() if p.is_file())]))
    for f in (Path("/etc/apt/preferences"), Path("/etc/apt/sources.list"),
              Path("/var/lib/dpkg/arch")):
        stamps.append(f.stat().st_mtime_ns if f.exists() else 0)
    return ",".join(map(str, stamps))


def _apt_cache(argv: list[str], arch: str) -> str:
    """``apt-cache`` output, remembered until apt's lists change: a query costs seconds on a
    busy machine, and a cache hit of the image build should cost nothing."""
    memo = debs_dir(arch) / "apt-cache-memo.json"
    stamp = _apt_stamp()
    key = "\0".join(argv)
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(memo.read_text())
    if data.get("stamp") != stamp:
        data = {"stamp": stamp, "queries": {}}
    if key not in data["queries"]:
        data["queries"][key] = _run(["apt-cache", *argv])
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(memo)
    return str(data["queries"][key])


def resolve(names: Iterable[str], arch: str) -> dict[str, Deb]:
    """Candidate versions of ``names`` for Debian architecture ``arch``, in one apt-cache call."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    out = _apt_cache(["show", "--no-all-versions", *[f"{n}:{arch}" for n in wanted]], arch)
    found: dict[str, Deb] = {}
    for stanza in out.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if "Package" in fields and fields["Package"] not in found:
            found[fields["Package"]] = Deb(fields["Package"], fields["Version"],
                                           fields.get("Architecture", arch))
    missing = [n for n in wanted if n not in found]
    if missing:
        raise PackageError(f"no {arch} candidate for {', '.join(missing)}: "
                           f"is `dpkg --add-architecture {arch}` plus `apt-get update` done?")
    return found


def kernel_package(arch: str) -> str:
    """The versioned kernel package behind the ``linux-image-<arch>`` metapackage."""
    out = _apt_cache(["depends", f"linux-image-{arch}:{arch}"], arch)
    match = re.search(r"Depends: (linux-image-[0-9][^\s:]*)", out)
    if not match:
        raise PackageError(f"cannot find the kernel behind linux-image-{arch}")
    return match.group(1)


def debs_dir(arch: str) -> Path:
    return cache_dir("debs", arch)


def fetch(debs: Iterable[Deb], arch: str) -> dict[str, Path]:
    """Download what is not cached yet (one apt-get call); return name -> .deb path."""
    where = debs_dir(arch)
    wanted = sorted(debs, key=lambda d: d.name)
    paths = {d.name: where / d.filename for d in wanted}
    todo = [d for d in wanted if not (where / d.filename).exists()]
    if todo:
        log.info("downloading %d %s packages", len(todo), arch)
        # _apt cannot write into a root-owned cache: apt then downloads unsandboxed and warns
        _run(["apt-get", "download", "-q", *[f"{d.name}:{arch}={d.version}" for d in todo]],
             cwd=where)
    for name, path in paths.items():
        if not path.exists():
            raise PackageError(f"apt-get download did not produce {path.name} for {name}")
    return paths


def extract(deb: Path) -> Path:
    """``dpkg -x`` into the cache once; later calls return the same tree."""
    target = deb.parent / "x" / deb.name.removesuffix(".deb")
    if (target / ".hil-extracted").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    (tmp / ".hil-extracted").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# --- ELF: which interpreter and sonames a binary asks for -----------------------------------

@dataclass(frozen=True)
class ElfDeps:
    interp: str | None
    needed: tuple[str, ...]


def elf_deps(path: Path) -> ElfDeps | None:
    """PT_INTERP and DT_NEEDED of a 64-bit little-endian ELF file; None if it is not one."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    interp = None
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
                for i in range(e_shnum)]
    needed: list[str] = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val:end].decode())
    return ElfDeps(interp, tuple(needed))


# Used only when the host has no amd64 copy of a library to ask `dpkg -S` about.
KNOWN_SONAMES = {
    "libc.so.6": "libc6", "libm.so.6": "libc6", "libresolv.so.2": "libc6",
    "libcrypt.so.1": "libcrypt1", "libz.so.1": "zlib1g", "libtomcrypt.so.1": "libtomcrypt1",
    "libtommath.so.1": "libtommath1", "libgmp.so.10": "libgmp10", "libjq.so.1": "libjq1",
    "libonig.so.5": "libonig5", "libcap.so.2": "libcap2", "libedit.so.2": "libedit2",
    "libgnutls.so.30": "libgnutls30", "libnettle.so.8": "libnettle8",
    "libhogweed.so.6": "libhogweed6", "libseccomp.so.2": "libseccomp2",
    "libtinfo.so.6": "libtinfo6", "libbsd.so.0": "libbsd0", "libmd.so.0": "libmd0",
    "libp11-kit.so.0": "libp11-kit0", "libidn2.so.0": "libidn2-0",
    "libunistring.so.2": "libunistring2", "libtasn1.so.6": "libtasn1-6", "libffi.so.8": "libffi8",
    "libext2fs.so.2": "libext2fs2", "libcom_err.so.2": "libcom-err2", "libblkid.so.1": "libblkid1",
    "libuuid.so.1": "libuuid1", "libe2p.so.2": "libe2p2", "libmount.so.1": "libmount1",
    "libsmartcols.so.1": "libsmartcols1", "libselinux.so.1": "libselinux1",
    "libpcre2-8.so.0": "libpcre2-8-0", "libudev.so.1": "libudev1",
    "ld-linux-aarch64.so.1": "libc6", "ld-linux-x86-64.so.2": "libc6",
    # dnsmasq's
    "libdbus-1.so.3": "libdbus-1-3", "libsystemd.so.0": "libsystemd0", "liblzma.so.5": "liblzma5",
    "libzstd.so.1": "libzstd1", "liblz4.so.1": "liblz4-1", "libgcrypt.so.20": "libgcrypt20",
    "libgpg-error.so.0": "libgpg-error0", "libnetfilter_conntrack.so.3": "libnetfilter-conntrack3",
    "libnfnetlink.so.0": "libnfnetlink0", "libmnl.so.0": "libmnl0",
    "libnftables.so.1": "libnftables1", "libnftnl.so.11": "libnftnl11",
    "libjansson.so.4": "libjansson4", "libxtables.so.12": "libxtables12",
    # iptables'
    "libip4tc.so.2": "libip4tc2", "libip6tc.so.2": "libip6tc2",
    # NetworkManager's and curl's (and libcurl's, glib's)
    "libndp.so.0": "libndp0", "libpsl.so.5": "libpsl5", "libaudit.so.1": "libaudit1",
    "libcap-ng.so.0": "libcap-ng0", "libcurl-gnutls.so.4": "libcurl3-gnutls",
    "libcurl.so.4": "libcurl4",
    **{f"lib{n}-2.0.so.0": "libglib2.0-0" for n in ("glib", "gio", "gobject", "gmodule")},
    "libbrotlidec.so.1": "libbrotli1", "libbrotlicommon.so.1": "libbrotli1",
    "libgssapi_krb5.so.2": "libgssapi-krb5-2", "libkrb5.so.3": "libkrb5-3",
    "libk5crypto.so.3": "libk5crypto3", "libkrb5support.so.0": "libkrb5support0",
    "libkeyutils.so.1": "libkeyutils1", "libldap-2.5.so.0": "libldap-2.5-0",
    "liblber-2.5.so.0": "libldap-2.5-0", "libsasl2.so.2": "libsasl2-2",
    "libnghttp2.so.14": "libnghttp2-14", "librtmp.so.1": "librtmp1", "libssh2.so.1": "libssh2-1",
    "libssl.so.3": "libssl3", "libcrypto.so.3": "libssl3",
    # openvpn's
    "liblzo2.so.2": "liblzo2-2", "libpkcs11-helper.so.1": "libpkcs11-helper1",
    "libnl-3.so.200": "libnl-3-200", "libnl-genl-3.so.200": "libnl-genl-3-200",
    # avahi-daemon's
    "libavahi-core.so.7": "libavahi-core7", "libavahi-common.so.3": "libavahi-common3",
    "libdaemon.so.0": "libdaemon0", "libexpat.so.1": "libexpat1",
}


def soname_package(soname: str) -> str:
    """Which package ships ``soname``: ask dpkg about the host's copy, else a known table."""
    if soname.startswith("ld-linux"):  # the host has only its own architecture's loader
        return "libc6"
    proc = subprocess.run(["dpkg", "-S", f"*/{soname}"], capture_output=True, text=True,
                          check=False)
    for line in proc.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        if path.endswith("/" + soname) and "-dbg" not in pkg:
            return pkg.split(":")[0]
    if soname in KNOWN_SONAMES:
        return KNOWN_SONAMES[soname]
    raise PackageError(f"cannot tell which package ships {soname}")


def find_in_tree(tree: Path, name: str) -> Path | None:
    """A shared library named ``name`` in an extracted package (lib dirs only)."""
    for libdir in ("lib", "usr/lib"):
        base = tree / libdir
        if not base.is_dir():
            continue
        for cand in sorted(base.rglob(name)):
            if cand.is_file() or cand.is_symlink():
                return cand
    return None
