"""Filesystem and disk writers that need neither root nor loop devices, and give the same bytes
for the same inputs (fixed timestamps, UUIDs and hash seeds; sorted file lists)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hil.errors import HilError
from hil.refos import debs

SECTOR = 512
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


# --- FAT -----------------------------------------------------------------------------------

def mkfat(disk: Path, offset: int, size: int, *, label: str, volid: str, epoch: int,
          files: Mapping[str, bytes]) -> None:
    """FAT16 at byte ``offset`` inside ``disk``, holding ``files`` (path -> content)."""
    run(["mkfs.fat", "-F", "16", "-n", label, "-i", volid, "--invariant",
         f"--offset={offset // SECTOR}", str(disk), str(size // 1024)])
    write_fat_files(disk, offset, files, epoch=epoch)


def _mtools_env(epoch: int) -> dict[str, str]:
    return {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(epoch), "TZ": "UTC",
            "MTOOLS_NO_VFAT": "0"}


def write_fat_files(disk: Path, offset: int, files: Mapping[str, bytes], *, epoch: int,
                    scratch: Path | None = None) -> None:
    """Create or replace files on the FAT at ``offset`` (directories made as needed)."""
    env = _mtools_env(epoch)
    target = f"{disk}@@{offset}"
    made: set[str] = set()
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for i, (name, content) in enumerate(sorted(files.items())):
            parts = name.strip("/").split("/")
            for depth in range(1, len(parts)):
                d = "/".join(parts[:depth])
                if d not in made:
                    made.add(d)
                    subprocess.run(["mmd", "-D", "s", "-i", target, f"::/{d}"], env={
                        **os.environ, **env}, capture_output=True, check=False)
            local = Path(tmp) / str(i)
            local.write_bytes(content)
            os.utime(local, (epoch, epoch))
            run(["mcopy", "-o", "-m", "-i", target, str(local), f"::/{name.strip('/')}"],
                env=env)


def read_fat_file(disk: Path, offset: int, name: str) -> bytes | None:
    proc = subprocess.run(["mtype", "-i", f"{disk}@@{offset}", f"::/{name.strip('/')}"],
                          capture_output=True, env={**os.environ, **_mtools_env(0)},
                          check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout


# --- GPT -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    name: str
    size: int | None  # bytes; None = the rest of the disk
    type_guid: str
    uuid: str
    start: int | None = None  # bytes; None = after the previous one
    attrs: str = ""


@dataclass(frozen=True)
class Placed:
    index: int
    name: str
    offset: int
    size: int


def write_gpt(disk: Path, size: int, disk_guid: str, parts: Sequence[Partition]) -> list[Placed]:
    """Create ``disk`` (sparse) of ``size`` bytes with a GPT; return where each partition is."""
    disk.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(size)
    lines = ["label: gpt", f"label-id: {disk_guid}", "unit: sectors", "first-lba: 34", ""]
    for p in parts:
        fields = []
        if p.start is not None:
            fields.append(f"start={p.start // SECTOR}")
        if p.size is not None:
            fields.append(f"size={p.size // SECTOR}")
        fields += [f"type={p.type_guid}", f"uuid={p.uuid}", f'name="{p.name}"']
        if p.attrs:
            fields.append(f'attrs="{p.attrs}"')
        lines.append(", ".join(fields))
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
        input=("\n".join(lines) + "\n").encode())
    return read_gpt(disk)


def read_gpt(disk: Path) -> list[Placed]:
    table = json.loads(run(["sfdisk", "-J", str(disk)]))["partitiontable"]
    placed = []
    for p in table["partitions"]:
        index = int(p["node"][len(str(disk)):].lstrip("p"))
        placed.append(Placed(index, p.get("name", ""), p["start"] * SECTOR, p["size"] * SECTOR))
    return placed


# --- sparse copy and bmap ------------------------------------------------------------------

def _data_extents(f: int, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(f, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(f, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def copy_into(src: Path, disk: Path, offset: int) -> None:
    """Write ``src`` into ``disk`` at ``offset``, skipping holes and zero blocks."""
    size = src.stat().st_size
    zero = bytes(BLOCK)
    with src.open("rb") as fi, disk.open("r+b") as fo:
        for start, end in _data_extents(fi.fileno(), size):
            fi.seek(start)
            pos = start
            while pos < end:
                chunk = fi.read(min(1 << 20, end - pos))
                for i in range(0, len(chunk), BLOCK):
                    block = chunk[i:i + BLOCK]
                    if block != zero[:len(block)]:
                        fo.seek(offset + pos + i)
                        fo.write(block)
                pos += len(chunk)


def mapped_ranges(img: Path) -> list[tuple[int, int]]:
    """Inclusive block ranges that hold any non-zero byte: holes and zero blocks are unmapped,
    so the map depends on the content only, not on how the host filesystem stored it."""
    size = img.stat().st_size
    ranges: list[tuple[int, int]] = []
    with img.open("rb") as f:
        for start, end in _data_extents(f.fileno(), size):
            first = start // BLOCK
            f.seek(first * BLOCK)
            for blk in range(first, (end + BLOCK - 1) // BLOCK):
                if not f.read(BLOCK).rstrip(b"\0"):
                    continue
                if ranges and ranges[-1][1] == blk - 1:
                    ranges[-1] = (ranges[-1][0], blk)
                else:
                    ranges.append((blk, blk))
    return ranges


def write_bmap(img: Path, bmap: Path) -> None:
    """bmaptool's XML format 2.0 with a SHA256 per range and over the file itself."""
    size = img.stat().st_size
    blocks = (size + BLOCK - 1) // BLOCK
    ranges = mapped_ranges(img)
    mapped = sum(b - a + 1 for a, b in ranges)
    body = []
    with img.open("rb") as f:
        for a, b in ranges:
            h = hashlib.sha256()
            f.seek(a * BLOCK)
            left = (b - a + 1) * BLOCK
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            rng = f"{a}-{b}" if a != b else f"{a}"
            body.append(f'        <Range chksum="{h.hexdigest()}"> {rng} </Range>\n')
    head = (
        '<?xml version="1.0" ?>\n'
        "<!-- Block map of a pytest-hil reference OS image: the blocks that hold data.\n"
        "     Copy with `bmaptool copy IMAGE DEVICE`. -->\n"
        '<bmap version="2.0">\n'
        f"    <ImageSize> {size} </ImageSize>\n"
        f"    <BlockSize> {BLOCK} </BlockSize>\n"
        f"    <BlocksCount> {blocks} </BlocksCount>\n"
        f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n"
        "    <ChecksumType> sha256 </ChecksumType>\n"
        "    <BmapFileChecksum> {chk} </BmapFileChecksum>\n"
        "    <BlockMap>\n"
    )
    tail = "    </BlockMap>\n</bmap>\n"
    draft = head.replace("{chk}", "0" * 64) + "".join(body) + tail
    chk = hashlib.sha256(draft.encode()).hexdigest()
    bmap.write_text(head.replace("{chk}", chk) + "".join(body) + tail)


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
