"""Prepare a balenaOS image: put config.json (and friends) into its boot partition.

No mounting and no root: the FAT boot partition is found by parsing the partition table
(``partitions``) and written with mtools at its byte offset (``fat``).
Results are cached by content: (image digest, configuration digest) -> prepared image, so a
rerun does no work. The image digest is remembered per (path, size, mtime, inode), so an
unchanged input is not even re-read. Compressed inputs are decompressed once into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from hil.cache import cache_dir
from hil.errors import ConfigError, InfraError
from hil.flash import fat
from hil.flash.bmap import create_bmap, write_bmap
from hil.flash.partitions import Partition, find_partition, labelled
from hil.flash.pipeline import CHUNK, nonzero_runs
from hil.flash.source import open_source
from hil.redact import redact, secret_values

log = logging.getLogger(__name__)

BOOT_LABELS = ("resin-boot", "balena-boot")
RECIPE_VERSION = 1  # bump when the preparation changes, so old cache entries are not reused


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def image_digest(image: Path) -> str:
    """SHA-256 of the file, remembered by (path, size, mtime, inode): hashed once per change."""
    st = image.stat()
    key = hashlib.sha256(f"{image.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0"
                         f"{st.st_dev}".encode()).hexdigest()
    memo = cache_dir("images", "digests") / key
    try:
        return memo.read_text().strip()
    except FileNotFoundError:
        pass
    digest = _sha256_file(image)
    _atomic_write(memo, digest.encode())
    return digest


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy only the data extents (in-kernel copy_file_range); holes stay holes."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
                end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            except OSError:  # ENXIO: the rest is a hole
                break
            while start < end:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), end - start, start, start)
                if n <= 0:
                    raise InfraError(f"copying {src} to {dst} stopped at {start}",
                                     part="flash")
                start += n
            pos = end


def decompress_to(image: Path, dst: Path) -> None:
    """Decompress into a sparse file (zero blocks become holes)."""
    with open_source(image) as src, open(dst, "wb") as out:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        offset = 0
        while n := src.readinto(view):
            for start, end in nonzero_runs(view[:n], offset):
                os.pwrite(out.fileno(), view[start - offset:end - offset], start)
            offset += n
            if n < len(view):
                break
        out.truncate(offset)


def _base_image(image: Path, digest: str) -> Path:
    """The raw image to start from: the input itself, or its decompressed copy in the cache."""
    with open_source(image) as src:
        if src.format == "raw":
            return image
    base = cache_dir("images") / f"base-{digest[:32]}.img"
    if not base.exists():
        log.info("decompressing %s into the image cache", image)
        tmp = base.with_name(f".{base.name}.{os.getpid()}.tmp")
        try:
            decompress_to(image, tmp)
            tmp.replace(base)
        finally:
            tmp.unlink(missing_ok=True)
    return base


def _check_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        raise ConfigError(f"extra file {name!r} must be a relative path inside the boot "
                          "partition, without '..'")
    return str(p)


def _merge_config_txt(old: str, lines: Sequence[str]) -> str:
    """Append missing lines under an [all] section, so a preceding [pi4] filter cannot scope
    them; later settings override earlier ones in config.txt."""
    have = {line.strip() for line in old.splitlines()}
    new = [line for line in lines if line.strip() not in have]
    if not new:
        return old
    text = old if not old or old.endswith("\n") else old + "\n"
    text += "# added by pytest-hil\n"
    if any(line.strip().startswith("[") for line in old.splitlines()):
        text += "[all]\n"
    return text + "".join(line.rstrip("\n") + "\n" for line in new)


def _write_files(image: Path, part: Partition, files: Mapping[str, bytes],
                 config_txt_lines: Sequence[str], secrets: list[str], *, shown: Path) -> None:
    files = dict(files)
    try:
        if config_txt_lines:
            # over an extra config.txt if one is given, else over the image's own
            old = (files["config.txt"] if "config.txt" in files
                   else fat.read_file(image, part, "config.txt"))
            text = old.decode(errors="replace") if old is not None else ""
            files["config.txt"] = _merge_config_txt(text, config_txt_lines).encode()
        fat.write_files(image, part, files, secrets=secrets, scratch=cache_dir("images"))
    except InfraError as exc:
        raise InfraError(f"{exc.message} (the configured copy of {shown})", part="flash",
                         tail=exc.tail) from exc


def _recipe_digest(config: Mapping[str, Any], files: Mapping[str, bytes],
                   config_txt_lines: Sequence[str]) -> str:
    recipe = {"v": RECIPE_VERSION, "config": config, "config_txt": list(config_txt_lines),
              "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def configure_image(image: str | os.PathLike[str], config: Mapping[str, Any], *,
                    extra_files: Mapping[str, bytes] | None = None,
                    config_txt_lines: Sequence[str] | None = None,
                    out: str | os.PathLike[str] | None = None) -> Path:
    """A copy of ``image`` whose boot partition holds ``config`` as config.json, plus
    ``extra_files`` (paths relative to the partition, e.g. ``system-connections/wifi``) and
    ``config_txt_lines`` (e.g. ``enable_uart=1``) added to config.txt. The input is never
    modified. Returns the prepared image: in the cache, or ``out`` if given; its block map is
    next to it (``bmap_path(image)``), as the input's own bmap does not fit it any more."""
    src = Path(image)
    if not isinstance(config, Mapping):
        raise ConfigError("config.json must be a JSON object", file=str(src))
    files = {"config.json": json.dumps(config).encode()}
    for name, data in (extra_files or {}).items():
        files[_check_name(name)] = bytes(data)
    lines = list(config_txt_lines or [])
    secrets = secret_values(config)
    if not src.is_file():
        raise ConfigError("image not found", file=str(src))

    digest = image_digest(src)
    prepared = cache_dir("images") / (f"{digest[:24]}-"
                                      f"{_recipe_digest(config, files, lines)[:24]}.img")
    if prepared.exists():
        log.info("prepared image for %s is cached: %s", src, prepared)
    else:
        base = _base_image(src, digest)
        part = find_partition(base, BOOT_LABELS, name=src)  # before copying: errors name src
        tmp = prepared.with_name(f".{prepared.name}.{os.getpid()}.tmp")
        try:
            copy_sparse(base, tmp)
            log.info("writing config.json (%s) and %d more files into %s of %s",
                     json.dumps(redact(dict(config)), sort_keys=True), len(files) - 1,
                     part.describe(), src)
            _write_files(tmp, part, files, lines, secrets, shown=src)
            # the base image's bmap no longer fits (the boot partition changed): make ours
            write_bmap(create_bmap(tmp), bmap_path(prepared))
            tmp.replace(prepared)
        finally:
            tmp.unlink(missing_ok=True)
        prune_prepared(keep=KEEP_PREPARED)
    return _deliver(prepared, Path(out)) if out is not None else prepared


def boot_partition(image: str | os.PathLike[str]) -> tuple[Partition | None, str]:
    """The balena boot partition of ``image`` (any format the flasher reads), or None, and
    what the image holds. A compressed image is decompressed into the cache, once: a
    ``configure_image`` that follows starts from that copy."""
    src = Path(image)
    if not src.is_file():
        raise ConfigError("image not found", file=str(src))
    return labelled(_base_image(src, image_digest(src)), BOOT_LABELS, name=src)


KEEP_PREPARED = 6  # each test session configures its own identity: keep the newest few


def prune_prepared(keep: int) -> None:
    """Drop all but the ``keep`` newest prepared images (and their bmaps) from the cache."""
    folder = cache_dir("images")
    prepared = sorted((p for p in folder.glob("*.img") if not p.name.startswith("base-")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for old in prepared[keep:]:
        old.unlink(missing_ok=True)
        bmap_path(old).unlink(missing_ok=True)


def bmap_path(image: Path) -> Path:
    """Where configure_image leaves the block map of a prepared image: ``IMAGE.bmap``."""
    return image.with_name(image.name + ".bmap")


def _deliver(prepared: Path, out: Path) -> Path:
    """Copy to ``out`` unless it is still the copy we made last time (then: no work)."""
    stamp = prepared.with_suffix(".out.json")
    try:
        st = out.stat()
        last = json.loads(stamp.read_text())
        if last == {"path": str(out.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                    "ino": st.st_ino}:
            return out
    except (OSError, ValueError):
        pass
    if out.resolve() != prepared.resolve():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            copy_sparse(prepared, tmp)
            shutil.copyfile(bmap_path(prepared), bmap_path(out))
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    st = out.stat()
    _atomic_write(stamp, json.dumps({"path": str(out.resolve()), "size": st.st_size,
                                     "mtime": st.st_mtime_ns, "ino": st.st_ino}).encode())
    return out
