"""ext4 without root: size, mkfs -d, restore metadata by inode number, fsck.

The parameters that shape the bytes are pinned (``MKFS``) and recorded in the
derivation. mke2fs reads a config we write ourselves, so /etc/mke2fs.conf of
the build host does not leak in, and every e2fsprogs run gets
E2FSPROGS_FAKE_TIME and a UUID/hash seed derived from the store key.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import signal
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_build import debugfs
from banger_build.errors import ImageError, Reason, ToolError
from banger_build.run import run
from banger_build.tree import DIR, REG, SPECIAL, SYMLINK, Inode, Node, Tree, name_bytes

BLOCK = 4096
INODE_SIZE = 256
MiB = 1 << 20
FEATURES = "has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"
_GROUP_BLOCKS = 8 * BLOCK  # blocks per group = bits in one bitmap block
_LOST_FOUND_INO = 11
#: The largest image we make: 2^32 - 1 blocks of 4 KiB (16 TiB less 4 KiB). The
#: image is a file on the host, and ext4 hosts cap a file there; mke2fs also drops
#: resize_inode above 2^32 blocks, which the overhead estimate below assumes.
MAX_SIZE = (2**32 - 1) * BLOCK
#: mke2fs 1.47.0 (``-d``) builds each entry's path ("/a/b") in a buffer of 255
#: bytes, doubled when too short, checking one byte less than it writes: the NUL
#: of a path as long as the buffer lands one byte past it. glibc rounds the
#: 255/510/1020/4080/... byte buffers up, so only 2040 corrupts the heap (measured
#: here: every path of exactly 2040 bytes aborts mke2fs; 2039 and 2041 build).
#: Entries with such a path are refused (flatten, and ``tree_usage`` as a backstop).
MKE2FS_BAD_PATH = 2040
#: Script lines per debugfs run when listing directories: bounds the output held in
#: memory (about 60 bytes an entry) whatever the size of the image.
_LIST_BATCH = 16_384


@dataclass(frozen=True)
class MkfsParams:
    block_size: int = BLOCK
    inode_size: int = INODE_SIZE
    features: str = FEATURES
    reserved_percent: int = 0
    inode_ratio: int = 16384
    label: str = "rootfs"

    def as_dict(self) -> dict[str, object]:
        return {
            "block_size": self.block_size,
            "inode_size": self.inode_size,
            "features": self.features.split(","),
            "reserved_percent": self.reserved_percent,
            "inode_ratio": self.inode_ratio,
            "label": self.label,
        }

    def config(self) -> str:
        """The mke2fs.conf we run with (MKE2FS_CONFIG), so the host's does not leak."""
        return (
            "[defaults]\n"
            "\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr\n"
            "\tdefault_mntopts = acl,user_xattr\n"
            "\tenable_periodic_fsck = 0\n"
            f"\tblocksize = {self.block_size}\n"
            f"\tinode_size = {self.inode_size}\n"
            f"\tinode_ratio = {self.inode_ratio}\n"
            "\n[fs_types]\n"
            f"\text4 = {{\n\t\tfeatures = {self.features}\n\t}}\n"
        )


MKFS = MkfsParams()


# -- sizing -----------------------------------------------------------------


@dataclass(frozen=True)
class SizePlan:
    size: int  # bytes of the image file
    inodes: int  # -N
    needed: int  # the smallest size that holds the tree


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _dir_blocks(node: Node) -> int:
    assert node.children is not None
    # ext4 dirent: 8-byte header + name, padded to 4; '.' and '..' take 24 bytes.
    used = 24 + sum(8 + ((len(name_bytes(n)) + 3) & ~3) for n in node.children)
    blocks = _blocks(used)
    if blocks > 1:  # htree index blocks and half-full leaves after splits
        blocks = blocks * 3 // 2 + 1
    return blocks


def tree_usage(tree: Tree) -> tuple[int, int]:
    """(data blocks, inodes) the tree needs, from the tar headers alone.

    Also the last check before ``mke2fs -d`` sees the staging tree: no staged
    path may be ``MKE2FS_BAD_PATH`` bytes long (entries added after flatten
    included).
    """
    blocks = 0
    inodes = 0
    seen: set[int] = set()  # only inodes with more than one name can repeat
    for path, node in tree.walk():
        inode = node.inode
        if node.is_dir:
            blocks += _dir_blocks(node)
        if len(name_bytes(path)) + 1 == MKE2FS_BAD_PATH and inode.type not in SPECIAL:
            raise ImageError(
                f"/{path}: a path of exactly {MKE2FS_BAD_PATH} bytes makes mke2fs 1.47.0 "
                "overrun its path buffer and abort",
                reason=Reason.MKE2FS_PATH,
            )
        if inode.nlink > 1:
            if id(inode) in seen:
                continue
            seen.add(id(inode))
        inodes += 1
        if inode.type == REG:
            data = _blocks(inode.size if inode.data is None else inode.data)
            # extent tree: 4 extents fit in the inode; beyond, ~340 per index block
            blocks += data + (data // 32768 // 300 + 1 if data > 4 * 32768 else 0)
        elif inode.type == SYMLINK and inode.size >= 60:
            blocks += 1
        if inode.xattrs and sum(len(k) + len(v) + 20 for k, v in inode.xattrs.items()) > 96:
            blocks += 1
    return blocks, inodes


def journal_blocks(total_blocks: int) -> int:
    """mke2fs's default journal size (ext2fs_default_journal_size) for 4 KiB blocks."""
    for limit, size in (
        (2048, 0),
        (32768, 1024),
        (256 * 1024, 4096),
        (512 * 1024, 8192),
        (4096 * 1024, 16384),
        (8192 * 1024, 32768),
        (16384 * 1024, 65536),
        (32768 * 1024, 131072),
    ):
        if total_blocks < limit:
            return size
    return 262144


def _overhead_blocks(total_blocks: int, inodes: int) -> int:
    groups = -(-total_blocks // _GROUP_BLOCKS)
    inode_tables = _blocks(inodes * INODE_SIZE)
    # bitmaps, descriptors and reserved GDT blocks (resize_inode) in the backup groups
    gdt = _blocks(groups * 64) + min(1024, max(16, groups))
    return (
        inode_tables
        + 2 * groups
        + backup_groups(groups) * (gdt + 1)
        + journal_blocks(total_blocks)
        + 64
    )


def backup_groups(groups: int) -> int:
    """Groups with a superblock backup under sparse_super, of ``groups``: group 0,
    group 1 and the powers of 3, 5 and 7 below ``groups`` (O(log n), for any size)."""
    count = 1 + (groups > 1)
    for base in (3, 5, 7):
        n = base
        while n < groups:
            count += 1
            n *= base
    return count


def _inode_count(inodes: int, size: int) -> int:
    return max(inodes + inodes // 4 + 256, size // MKFS.inode_ratio)


def _fits(data: int, inodes: int, size: int) -> bool:
    """Does a filesystem of ``size`` bytes hold ``data`` blocks and ``inodes``?

    Overhead is computed for this very size: mke2fs's journal grows in steps
    (none below 8 MiB, 4 MiB below 128 MiB, 16 MiB below 1 GiB, ...), so an
    estimate made for a smaller size can be short once rounded up.
    """
    blocks = size // BLOCK
    used = data + _overhead_blocks(blocks, _inode_count(inodes, size))
    return used + used // 50 + 256 <= blocks  # slack for allocator fragmentation


def _smallest_fitting(data: int, inodes: int, start: int) -> int:
    """The smallest size from ``start`` on (in ~1% steps) that holds the tree."""
    size = _round_mib(max(start, MiB))
    while size <= MAX_SIZE and not _fits(data, inodes, size):
        size += max(MiB, _round_mib(size // 128))
    if size > MAX_SIZE:
        raise ImageError(
            f"the image would need more than {MAX_SIZE} bytes (16TiB less 4KiB), the "
            "largest ext4 image banger-build makes",
            reason=Reason.SIZE_TOO_LARGE,
        )
    return size


def plan_size(tree: Tree, *, auto: bool, size: int) -> SizePlan:
    """Size the image from the tree; ``size`` is the fixed size, or auto's headroom.

    Any ``size`` is answered at once: the work grows with log(size) only.
    """
    data, inodes = tree_usage(tree)
    if not auto and size > MAX_SIZE:
        raise ImageError(
            f"the size {human(size)} is larger than {MAX_SIZE} bytes (16TiB less 4KiB), the "
            "largest ext4 image banger-build makes",
            reason=Reason.SIZE_TOO_LARGE,
        )
    needed = _smallest_fitting(data, inodes, data * BLOCK)
    if auto:
        final = _smallest_fitting(data, inodes, needed + needed // 10 + size)
    else:
        final = size
        if not _fits(data, inodes, final):
            raise ImageError(
                f"the size {human(final)} is too small: the image needs at least "
                f'{human(needed)} ({needed} bytes); use size = "auto" or a larger size',
                reason=Reason.SIZE_TOO_SMALL,
            )
    return SizePlan(size=final, inodes=_inode_count(inodes, final), needed=needed)


def _round_mib(n: int) -> int:
    return -(-n // MiB) * MiB


def human(n: int) -> str:
    """Bytes for a message: the largest exact binary unit, else rounded up to MiB."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    if n >= MiB:
        return f"{math.ceil(n / MiB)}MiB"
    return f"{n}B"


# -- identity from the store key --------------------------------------------


def derived_uuid(key: str, purpose: str) -> str:
    """A non-zero RFC 4122 version-4-shaped UUID derived from the store key."""
    raw = bytearray(hashlib.sha256(f"{purpose}:{key}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


# -- mkfs -------------------------------------------------------------------


def make_filesystem(
    image: Path, staging: Path, plan: SizePlan, *, key: str, epoch: int, workdir: Path
) -> None:
    """``mkfs.ext4 -d`` the staging tree into ``image`` with pinned parameters."""
    conf = workdir / "mke2fs.conf"
    conf.write_text(MKFS.config())
    _create_image(image, plan.size)
    fs_uuid = derived_uuid(key, "fs-uuid")
    seed = derived_uuid(key, "hash-seed")
    env = debugfs.fake_time_env(epoch)
    env["MKE2FS_CONFIG"] = os.fspath(conf)
    try:
        run(
            [
                "mkfs.ext4", "-F", "-q", "-t", "ext4",
                "-b", str(MKFS.block_size), "-I", str(MKFS.inode_size),
                "-N", str(plan.inodes), "-m", str(MKFS.reserved_percent),
                "-L", MKFS.label, "-U", fs_uuid,
                "-E", f"root_owner=0:0,hash_seed={seed},no_copy_xattrs,assume_storage_prezeroed=1",
                "-d", os.fspath(staging), os.fspath(image),
            ],
            env=env,
        )  # fmt: skip
    except ToolError as exc:
        if _host_full(exc.stderr):
            raise ImageError(
                f"the disk holding {image.parent} filled up while mkfs wrote the image "
                f"({_free_bytes(image.parent)}): free space there, or set "
                "BANGER_BUILD_HOME to a larger disk",
                reason=Reason.HOST_DISK_FULL,
            ) from exc
        if "Could not allocate" in exc.stderr:  # libext2fs: the image itself is full
            raise ImageError(
                f"the image of {human(plan.size)} ran out of space during mkfs "
                f"(estimated need {human(plan.needed)}); increase size",
                reason=Reason.SIZE_TOO_SMALL,
            ) from exc
        raise


#: How a write refused by the host reads in mke2fs's stderr (strerror of ENOSPC and
#: EDQUOT, or unix_io's short write); libext2fs's own "Could not allocate block in
#: ext2 filesystem" is the image being full.
_HOST_FULL = ("No space left on device", "Disk quota exceeded", "short write")


def _host_full(stderr: str) -> bool:
    """Did mkfs fail because the host's disk (not the image) filled up?"""
    return any(text in stderr for text in _HOST_FULL)


def _free_bytes(directory: Path) -> str:
    """Free space of the filesystem holding ``directory``, for a message."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return f"free space unknown: {exc.strerror}"
    return f"{human(st.f_bavail * st.f_frsize)} free"


def _create_image(image: Path, size: int) -> None:
    """A sparse file of ``size`` bytes, or ImageError when the host cannot hold one."""
    try:
        with open(image, "wb") as f:
            f.truncate(size)  # no positional size for mkfs: it is in 1 KiB units
    except OSError as exc:
        if exc.errno != errno.EFBIG:
            raise
        raise ImageError(
            f"the filesystem holding {image.parent} cannot hold a file of {human(size)} "
            f"({exc.strerror}); use a smaller size",
            reason=Reason.SIZE_TOO_LARGE,
        ) from exc


def _debugfs(
    image: Path, lines: Iterable[bytes], *, epoch: int, write: bool, **kwargs: Any
) -> bytes:
    """``debugfs.run_script``; a script refused as unsafe is an ImageError, not a crash.

    Every name and value in our scripts is checked before (flatten, inject), so
    this only fires on a bug; it must still end the build with one clear line.
    """
    try:
        return debugfs.run_script(image, lines, epoch=epoch, write=write, **kwargs)
    except debugfs.UnsafeScript as exc:
        raise ImageError(f"refusing to run a debugfs script on {image.name}: {exc}") from exc


# -- inode numbers ------------------------------------------------------------


def assign_inodes(image: Path, tree: Tree, *, epoch: int) -> list[Inode]:
    """Find each tree node's inode number by listing directories breadth-first.

    Directories are listed in batches of about ``_LIST_BATCH`` entries per
    debugfs run, so the listing held in memory is bounded. Returns the extra
    inodes mkfs made that the tree does not hold (lost+found), with the
    metadata they should get.
    """
    tree.root.inode.ino = 2
    extra: list[Inode] = []
    level: list[Node] = [tree.root]
    while level:
        next_level: list[Node] = []
        for batch in _batches(level):
            stdout = _debugfs(
                image,
                (b"ls -p " + debugfs.ino(n.inode.ino) for n in batch),
                epoch=epoch,
                write=False,
            )
            listing = debugfs.parse_ls(stdout)
            del stdout
            for node in batch:
                _match_listing(node, listing.pop(node.inode.ino, []), tree, extra, epoch)
                assert node.children is not None
                next_level.extend(c for c in node.children.values() if c.is_dir)
        level = next_level
    return extra


def _batches(level: list[Node]) -> Iterator[list[Node]]:
    batch: list[Node] = []
    entries = 0
    for node in level:
        assert node.children is not None
        if batch and entries + len(node.children) > _LIST_BATCH:
            yield batch
            batch, entries = [], 0
        batch.append(node)
        entries += len(node.children)
    if batch:
        yield batch


def _match_listing(
    node: Node, listing: list[debugfs.DirEntry], tree: Tree, extra: list[Inode], epoch: int
) -> None:
    """Give ``node``'s children the inode numbers its debugfs listing shows."""
    assert node.children is not None
    by_name = {name_bytes(k): v for k, v in node.children.items()}
    for entry in listing:
        if entry.name in (b".", b".."):
            continue
        child = by_name.pop(entry.name, None)
        if child is None:
            if node is tree.root and entry.name == b"lost+found":
                extra.append(Inode(DIR, perm=0o700, mtime=epoch, ino=entry.ino))
                continue
            raise ImageError(f"mkfs produced an unexpected entry {entry.name!r}")
        if child.inode.ino not in (0, entry.ino):
            raise ImageError(f"hard link {entry.name!r} split by mkfs")
        child.inode.ino = entry.ino
    missing = [n for n, c in by_name.items() if c.inode.type not in SPECIAL]
    if missing:
        raise ImageError(f"mkfs did not copy {missing[:5]!r}")


def make_special_nodes(image: Path, tree: Tree, *, epoch: int) -> None:
    """Create fifos and device nodes (never staged) with debugfs ``mknod``.

    The first path of each inode is made with mknod (which prints the number
    it allocated); further hard links to it are added with ``ln``.
    """
    made: list[tuple[Node, str, Inode]] = []
    linked: list[tuple[Node, str, Inode]] = []
    seen: set[int] = set()
    for entry in _special_entries(tree):
        (linked if id(entry[2]) in seen else made).append(entry)
        seen.add(id(entry[2]))
    if not made:
        return
    kinds = {"fifo": b"p", "chr": b"c", "blk": b"b"}

    def mknods() -> Iterator[bytes]:
        for dir_node, name, inode in made:
            args = b"" if inode.type == "fifo" else b" %d %d" % inode.rdev
            yield b"cd " + debugfs.ino(dir_node.inode.ino)
            yield b"mknod " + debugfs.quote(name_bytes(name)) + b" " + kinds[inode.type] + args

    allocated = debugfs.parse_allocated(_debugfs(image, mknods(), epoch=epoch, write=True))
    if len(allocated) != len(made):
        raise ImageError("debugfs mknod did not allocate every special node")
    for (_, _, inode), number in zip(made, allocated, strict=True):
        inode.ino = number

    def links() -> Iterator[bytes]:
        for dir_node, name, inode in linked:
            yield b"cd " + debugfs.ino(dir_node.inode.ino)
            yield b"ln " + debugfs.ino(inode.ino) + b" " + debugfs.quote(name_bytes(name))

    if linked:
        _debugfs(image, links(), epoch=epoch, write=True, output=False)


def _special_entries(tree: Tree) -> Iterator[tuple[Node, str, Inode]]:
    for _, node in tree.walk():
        if node.children:
            for name in sorted(node.children, key=name_bytes):
                child = node.children[name]
                if child.inode.type in SPECIAL:
                    yield node, name, child.inode


# -- metadata -----------------------------------------------------------------


def ownership_script(inodes: list[Inode], *, epoch: int, xattr_dir: Path) -> Iterator[bytes]:
    """``sif`` uid/gid/mode/times (and xattrs, link counts) of every inode, by number.

    A generator: the script of a large image is never held whole (11 lines an
    inode). Each xattr value is written to a file in ``xattr_dir`` as its
    ``ea_set -f`` line is produced.
    """
    xattr_files = 0
    for inode in sorted(inodes, key=lambda i: i.ino):
        n = debugfs.ino(inode.ino)
        t = b"@%d" % inode.mtime
        yield b"sif " + n + b" uid %d" % inode.uid
        yield b"sif " + n + b" gid %d" % inode.gid
        yield b"sif " + n + b" mode 0%o" % inode.mode
        yield b"sif " + n + b" atime " + t
        yield b"sif " + n + b" ctime " + t
        yield b"sif " + n + b" mtime " + t
        yield b"sif " + n + b" crtime @%d" % epoch
        yield b"sif " + n + b" atime_extra 0"
        yield b"sif " + n + b" ctime_extra 0"
        yield b"sif " + n + b" mtime_extra 0"
        yield b"sif " + n + b" crtime_extra 0"
        if inode.type in SPECIAL and inode.nlink > 1:
            yield b"sif " + n + b" links_count %d" % inode.nlink
        for name, value in sorted((inode.xattrs or {}).items()):
            path = xattr_dir / f"x{xattr_files}"
            xattr_files += 1
            path.write_bytes(value)
            yield b"ea_set -f " + os.fsencode(path.name) + b" " + n + b" " + name.encode("ascii")


def apply_metadata(
    image: Path, tree: Tree, extra: list[Inode], *, epoch: int, workdir: Path
) -> int:
    """Restore owner, mode, times and xattrs of every inode in one debugfs run.

    The script streams to debugfs through a file in ``workdir``; debugfs's echo
    of it (as long as the script) is discarded, not held.
    """
    xattr_dir = workdir / "xattrs"
    xattr_dir.mkdir(exist_ok=True)
    inodes = tree.inodes() + extra
    unassigned = sum(1 for i in inodes if i.ino == 0)
    if unassigned:
        raise ImageError(f"{unassigned} inodes have no number after mkfs")
    lines = ownership_script(inodes, epoch=epoch, xattr_dir=xattr_dir)
    _debugfs(image, lines, epoch=epoch, write=True, cwd=xattr_dir, output=False)
    return len(inodes)


#: e2fsck's exit status bits (e2fsck(8)); with -n nothing is ever corrected.
_FSCK_UNCORRECTED = 4
_FSCK_OPERATIONAL = 8


def check_filesystem(image: Path) -> None:
    """``e2fsck -fn``: an independent check before anything is published.

    Only exit status 4 ("errors left uncorrected") is a verdict on the image;
    a signal or status 8 and above (operational error, usage, cancelled,
    library) means e2fsck could not check it, and says so.
    """
    proc = run(["e2fsck", "-fn", os.fspath(image)], check=False)
    code = proc.returncode
    if code == 0:
        return
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines()
    tail = "\n".join(out[-15:])
    if code < 0:
        raise ToolError(
            f"e2fsck was killed by {_signal_name(-code)} while checking the image; "
            "the image was not checked",
            argv=["e2fsck", "-fn", os.fspath(image)],
            returncode=code,
        )
    if code >= _FSCK_OPERATIONAL:
        raise ToolError(
            f"e2fsck could not check the image (exit status {code}):\n{tail}",
            argv=["e2fsck", "-fn", os.fspath(image)],
            returncode=code,
        )
    raise ImageError(
        "e2fsck -fn found problems in the built image:\n" + tail, reason=Reason.FSCK_FAILED
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
