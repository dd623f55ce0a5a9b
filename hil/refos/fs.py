"""Filesystem writers of the reference OS builder (ext4, the initramfs's cpio) that need neither
root nor loop devices, and give the same bytes for the same inputs (fixed timestamps, UUIDs and
hash seeds; sorted file lists). The partition table, the FAT boot partition and the bmap are
written by hil.flash (partitions, fat, bmap), as for any image."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from hil.errors import HilError
from hil.flash.bmap import data_extents
from hil.flash.pipeline import nonzero_runs
from hil.refos import debs

BLOCK = 4096


class ImageBuildError(HilError):
    """A tool that writes part of the image failed."""


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        input: bytes | None = None) -> str:
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, env=full_env,
                              check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} not found: install it (apt-get)") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise ImageBuildError(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace")


def walk_sorted(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (not root itself), parents first, names sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def normalize_modes(root: Path) -> None:
    """0755 for directories and scripts/ELF files, 0644 for the rest, whatever the checkout's
    umask made of them (the modes end up in the image bytes)."""
    for path in walk_sorted(root):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
            continue
        with path.open("rb") as f:
            head = f.read(4)
        path.chmod(0o755 if head[:2] == b"#!" or head == b"\x7fELF" else 0o644)


def clamp_times(root: Path, epoch: int) -> None:
    """Set atime/mtime of the whole tree (symlinks themselves included) to ``epoch``."""
    for path in [*walk_sorted(root), root]:
        os.utime(path, (epoch, epoch), follow_symlinks=False)


# --- cpio (newc) for the initramfs ---------------------------------------------------------

def cpio_newc(root: Path, epoch: int,
              chardevs: Mapping[str, tuple[int, int]] | None = None) -> bytes:
    """A newc archive of ``root`` owned by root:root with fixed times, names sorted.
    ``chardevs`` adds device nodes (path -> major, minor), which need no root here."""
    out = bytearray()

    def entry(name: str, mode: int, data: bytes, ino: int, nlink: int = 1,
              rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            ino, mode, 0, 0, nlink, epoch, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0))
        out.extend(hdr.encode() + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    names = {p.relative_to(root).as_posix(): p for p in walk_sorted(root)}
    devs = dict(chardevs or {})
    for ino, name in enumerate(sorted([*names, *devs]), start=1):
        if name in devs:
            entry(name, stat.S_IFCHR | 0o600, b"", ino, rdev=devs[name])
            continue
        path = names[name]
        st = path.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            entry(name, stat.S_IFLNK | 0o777, os.readlink(path).encode(), ino)
        elif stat.S_ISDIR(st.st_mode):
            entry(name, stat.S_IFDIR | perm, b"", ino, nlink=2)
        else:
            entry(name, stat.S_IFREG | perm, path.read_bytes(), ino)
    entry("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def gzip_fixed(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


# --- ext4 ----------------------------------------------------------------------------------

def mkext4(img: Path, size: int, *, label: str, uuid: str, epoch: int, src: Path | None = None,
           journal: bool = True) -> None:
    """A standalone ext4 image file of ``size`` bytes, optionally populated from ``src``."""
    img.unlink(missing_ok=True)
    env = {"E2FSPROGS_FAKE_TIME": str(epoch), "MKE2FS_CONFIG": "/dev/null"}
    argv = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-L", label, "-U", uuid,
            "-I", "256", "-i", "8192", "-m", "0", "-T", "default",
            "-O", "ext_attr,dir_index,filetype,extent,64bit,flex_bg,sparse_super,large_file,"
                  "huge_file,dir_nlink,extra_isize,metadata_csum"
                  + (",has_journal" if journal else ",^has_journal"),
            "-E", f"hash_seed={uuid},root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,"
                  "nodiscard"]
    if src is not None:
        argv += ["-d", str(src)]
    run([*argv, str(img), f"{size // 1024}k"], env=env)
    if src is not None:
        # mkfs -d copies each file's ctime, which nobody can set, and its owner, which is
        # whoever builds: make both fixed (root-owned, epoch) for every inode.
        cmds = []
        for rel in ["/", *(f'"/{p.relative_to(src).as_posix()}"' for p in walk_sorted(src))]:
            cmds += [f"sif {rel} ctime @{epoch}", f"sif {rel} uid 0", f"sif {rel} gid 0"]
        run(["debugfs", "-w", "-f", "-", str(img)], env=env,
            input=("\n".join(cmds) + "\n").encode())


# --- placing a filesystem image inside the disk ---------------------------------------------

def copy_into(src: Path, disk: Path, offset: int) -> None:
    """Write ``src`` into ``disk`` at ``offset``: only its non-zero blocks, so the disk's holes
    (and its bmap, which maps content) do not depend on how the host stored ``src``."""
    size = src.stat().st_size
    view = memoryview(bytearray(1 << 20))
    with src.open("rb") as fi, disk.open("r+b") as fo:
        for first, last in data_extents(fi.fileno(), size, BLOCK):
            pos, end = first * BLOCK, min((last + 1) * BLOCK, size)
            while pos < end:
                n = os.preadv(fi.fileno(), [view[:min(len(view), end - pos)]], pos)
                if n <= 0:
                    raise ImageBuildError(f"{src}: short read at offset {pos}")
                for a, b in nonzero_runs(view[:n], pos, BLOCK):
                    os.pwrite(fo.fileno(), view[a - pos:b - pos], offset + a)
                pos += n


def install_busybox(root: Path, tree: Path) -> None:
    """busybox plus a relative symlink per applet. The applet list comes from the host's
    busybox-static (same Debian version); each name is checked against the guest binary."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    binary = root / "bin" / "busybox"
    shutil.copy2(tree / "bin" / "busybox", binary)
    blob = binary.read_bytes()
    try:
        listing = subprocess.run(["busybox", "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageBuildError("the host's busybox (busybox-static) is needed for the applet "
                              "list") from exc
    for rel in listing:
        name = Path(rel).name
        if rel == "linuxrc" or f"\0{name}\0".encode() not in blob:
            continue
        dst = root / rel
        if dst.exists() or dst.is_symlink():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath(binary, dst.parent))


def install_libraries(root: Path, triplet: str, elfs: list[Path], trees: Mapping[str, Path],
                      interp_done: set[str] | None = None) -> None:
    """Copy the dynamic loader and every shared library ``elfs`` need, transitively, from the
    extracted packages ``trees`` to /lib/<triplet>/<soname> (the loader's default search path
    on Debian). ``interp_done``: loaders already installed."""
    interp_done = set() if interp_done is None else interp_done
    libdir = root / "lib" / triplet
    libdir.mkdir(parents=True, exist_ok=True)
    search = sorted(trees.items())
    todo = list(elfs)
    seen: set[str] = set()
    while todo:
        deps = debs.elf_deps(todo.pop())
        if deps is None:
            continue
        if deps.interp and deps.interp not in interp_done:
            interp_done.add(deps.interp)
            src = _find_lib(search, Path(deps.interp).name)
            target = libdir / Path(deps.interp).name
            shutil.copy2(src.resolve(), target)
            dst = root / deps.interp.lstrip("/")
            if dst != target:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(os.path.relpath(target, dst.parent))
        for soname in deps.needed:
            if soname in seen:
                continue
            seen.add(soname)
            src = _find_lib(search, soname)
            shutil.copy2(src.resolve(), libdir / soname)
            todo.append(libdir / soname)


def _find_lib(search: Sequence[tuple[str, Path]], soname: str) -> Path:
    for _, tree in search:
        found = debs.find_in_tree(tree, soname)
        if found is not None:
            return found
    raise ImageBuildError(f"no extracted package contains {soname}")
