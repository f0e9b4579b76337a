"""ext4 without root: size, mkfs -d, restore metadata by inode number, fsck.

The parameters that shape the bytes are pinned (``MKFS``) and recorded in the
derivation. mke2fs reads a config we write ourselves, so /etc/mke2fs.conf of
the build host does not leak in, and every e2fsprogs run gets
E2FSPROGS_FAKE_TIME and a UUID/hash seed derived from the store key.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    """(data blocks, inodes) the tree needs, from the tar headers alone."""
    blocks = 0
    inodes = 0
    seen: set[int] = set()
    for _, node in tree.walk():
        inode = node.inode
        if node.is_dir:
            blocks += _dir_blocks(node)
        if id(inode) in seen:
            continue
        seen.add(id(inode))
        inodes += 1
        if inode.type == REG:
            data = _blocks(inode.size)
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
    backups = 1 + sum(1 for g in range(1, groups) if _is_backup_group(g))
    gdt = _blocks(groups * 64) + min(1024, max(16, groups))
    return inode_tables + 2 * groups + backups * (gdt + 1) + journal_blocks(total_blocks) + 64


def _is_backup_group(g: int) -> bool:
    if g in (0, 1):
        return True
    for base in (3, 5, 7):
        n = base
        while n < g:
            n *= base
        if n == g:
            return True
    return False


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
    size = _round_mib(max(start, MiB))
    while not _fits(data, inodes, size):
        size += max(MiB, _round_mib(size // 128))
    return size


def plan_size(tree: Tree, *, auto: bool, size: int) -> SizePlan:
    """Size the image from the tree; ``size`` is the fixed size, or auto's headroom."""
    data, inodes = tree_usage(tree)
    needed = _smallest_fitting(data, inodes, data * BLOCK)
    if auto:
        final = _smallest_fitting(data, inodes, needed + needed // 10 + size)
    else:
        final = size
        if not _fits(data, inodes, final):
            raise ImageError(
                f"the size {_human(final)} is too small: the image needs at least "
                f'{_human(needed)} ({needed} bytes); use size = "auto" or a larger size',
                reason=Reason.SIZE_TOO_SMALL,
            )
    return SizePlan(size=final, inodes=_inode_count(inodes, final), needed=needed)


def _round_mib(n: int) -> int:
    return -(-n // MiB) * MiB


def _human(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
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
    with open(image, "wb") as f:
        f.truncate(plan.size)  # no positional size: it is in 1 KiB units (the seed's bug)
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
        if "Could not allocate" in exc.stderr or "No space left" in exc.stderr:
            raise ImageError(
                f"the image of {_human(plan.size)} ran out of space during mkfs "
                f"(estimated need {_human(plan.needed)}); increase size",
                reason=Reason.SIZE_TOO_SMALL,
            ) from exc
        raise


# -- inode numbers ------------------------------------------------------------


def assign_inodes(image: Path, tree: Tree, *, epoch: int) -> list[Inode]:
    """Find each tree node's inode number by listing directories breadth-first.

    Returns the extra inodes mkfs made that the tree does not hold
    (lost+found), with the metadata they should get.
    """
    tree.root.inode.ino = 2
    extra: list[Inode] = []
    level: list[Node] = [tree.root]
    while level:
        stdout = debugfs.run_script(
            image, (b"ls -p " + debugfs.ino(n.inode.ino) for n in level), epoch=epoch, write=False
        )
        listing = debugfs.parse_ls(stdout)
        next_level: list[Node] = []
        for node in level:
            assert node.children is not None
            by_name = {name_bytes(k): v for k, v in node.children.items()}
            for entry in listing.get(node.inode.ino, []):
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
                if child.is_dir:
                    next_level.append(child)
            missing = [n for n, c in by_name.items() if c.inode.type not in SPECIAL]
            if missing:
                raise ImageError(f"mkfs did not copy {missing[:5]!r}")
        level = next_level
    return extra


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
    script: list[bytes] = []
    for dir_node, name, inode in made:
        args = b"" if inode.type == "fifo" else b" %d %d" % inode.rdev
        script += [
            b"cd " + debugfs.ino(dir_node.inode.ino),
            b"mknod " + debugfs.quote(name_bytes(name)) + b" " + kinds[inode.type] + args,
        ]
    allocated = debugfs.parse_allocated(debugfs.run_script(image, script, epoch=epoch, write=True))
    if len(allocated) != len(made):
        raise ImageError("debugfs mknod did not allocate every special node")
    for (_, _, inode), number in zip(made, allocated, strict=True):
        inode.ino = number
    script = []
    for dir_node, name, inode in linked:
        script += [
            b"cd " + debugfs.ino(dir_node.inode.ino),
            b"ln " + debugfs.ino(inode.ino) + b" " + debugfs.quote(name_bytes(name)),
        ]
    if script:
        debugfs.run_script(image, script, epoch=epoch, write=True)


def _special_entries(tree: Tree) -> Iterator[tuple[Node, str, Inode]]:
    for _, node in tree.walk():
        if node.children:
            for name in sorted(node.children, key=name_bytes):
                child = node.children[name]
                if child.inode.type in SPECIAL:
                    yield node, name, child.inode


# -- metadata -----------------------------------------------------------------


def ownership_script(inodes: list[Inode], *, epoch: int, xattr_dir: Path) -> list[bytes]:
    """``sif`` uid/gid/mode/times (and xattrs, link counts) of every inode, by number."""
    lines: list[bytes] = []
    xattr_files = 0
    for inode in sorted(inodes, key=lambda i: i.ino):
        n = debugfs.ino(inode.ino)
        t = b"@%d" % inode.mtime
        lines += [
            b"sif " + n + b" uid %d" % inode.uid,
            b"sif " + n + b" gid %d" % inode.gid,
            b"sif " + n + b" mode 0%o" % inode.mode,
            b"sif " + n + b" atime " + t,
            b"sif " + n + b" ctime " + t,
            b"sif " + n + b" mtime " + t,
            b"sif " + n + b" crtime @%d" % epoch,
            b"sif " + n + b" atime_extra 0",
            b"sif " + n + b" ctime_extra 0",
            b"sif " + n + b" mtime_extra 0",
            b"sif " + n + b" crtime_extra 0",
        ]
        if inode.type in SPECIAL and inode.nlink > 1:
            lines.append(b"sif " + n + b" links_count %d" % inode.nlink)
        for name in sorted(inode.xattrs):
            path = xattr_dir / f"x{xattr_files}"
            xattr_files += 1
            path.write_bytes(inode.xattrs[name])
            lines.append(
                b"ea_set -f " + os.fsencode(path.name) + b" " + n + b" " + name.encode("ascii")
            )
    return lines


def apply_metadata(
    image: Path, tree: Tree, extra: list[Inode], *, epoch: int, workdir: Path
) -> int:
    """Restore owner, mode, times and xattrs of every inode in one debugfs run."""
    xattr_dir = workdir / "xattrs"
    xattr_dir.mkdir(exist_ok=True)
    inodes = tree.inodes() + extra
    unassigned = [i for i in inodes if i.ino == 0]
    if unassigned:
        raise ImageError(f"{len(unassigned)} inodes have no number after mkfs")
    lines = ownership_script(inodes, epoch=epoch, xattr_dir=xattr_dir)
    debugfs.run_script(image, lines, epoch=epoch, write=True, cwd=xattr_dir)
    return len(inodes)


def check_filesystem(image: Path) -> None:
    """``e2fsck -fn``: an independent check before anything is published."""
    proc = run(["e2fsck", "-fn", os.fspath(image)], check=False)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines()
        raise ImageError(
            "e2fsck -fn found problems in the built image:\n" + "\n".join(out[-15:]),
            reason=Reason.FSCK_FAILED,
        )
