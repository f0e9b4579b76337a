"""Write ``rootfs.ext4`` from the flattened tree and the spool, directly.

Two passes over the tree, in its order (depth first, names in byte order):
the first numbers the inodes (root 2, lost+found 11, then 12, 13, ... as
first met; a hard link's later names share the number) and counts their
names; the second allocates each inode's blocks from one cursor (its xattr
block, its directory or data blocks, its extent tree) and writes them, the
file data copied from the spool by a thread of its own (``Copier``, in the
cursor's order). Then the bitmaps (ranges: nothing is ever freed), the group
descriptors and superblocks with their backups, the journal and the resize
inode. Once that metadata is written, a thread hashes the image front to back
behind the copies (``FollowingHash``): the image's sha256 costs about one
sha256 pass after the metadata, not a second read of the image after it.
Nothing comes from the host: numbers, placement, UUID, hash seed and times
follow from the tree, the key and the epoch.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import ImageError, Reason
from banger_build.ext4 import format as fmt
from banger_build.ext4.format import BLOCK, BLOCKS_PER_GROUP, INODE_SIZE, Extent
from banger_build.ext4.layout import (
    LOST_FOUND,
    LOST_FOUND_BLOCKS,
    Allocator,
    Geometry,
    ImageFull,
    SizePlan,
    data_runs,
    human,
    place_metadata,
    super_groups,
)
from banger_build.fsutil import FollowingHash, pwrite_all
from banger_build.spool import Copier, Spool, data_segments
from banger_build.tree import BLK, CHR, DIR, FIFO, REG, SYMLINK, Inode, Node, Tree, name_bytes

#: Bump when the writer would lay out the same tree differently.
FORMAT_VERSION = 1
LABEL = b"rootfs"
_FILE_TYPES = {
    REG: fmt.FT_REG,
    DIR: fmt.FT_DIR,
    SYMLINK: fmt.FT_SYMLINK,
    FIFO: fmt.FT_FIFO,
    CHR: fmt.FT_CHR,
    BLK: fmt.FT_BLK,
}
#: dir_nlink: a directory with more subdirectories than this has i_links_count 1.
_MAX_DIR_LINKS = 65000
#: Inode table bytes gathered before one write.
_FLUSH = 1 << 20


@dataclass(frozen=True)
class Written:
    inodes: int  # inodes in use, the reserved ones included
    blocks: int  # blocks in use
    sha256: str  # of the image file, as written (and fsynced)


def write_image(
    image: Path, tree: Tree, spool: Spool, plan: SizePlan, *, fs_uuid: str, hash_seed: str,
    epoch: int,
) -> Written:  # fmt: skip
    geometry = Geometry.make(plan.size, plan.inodes)
    fd = _create(image, plan.size)
    try:
        with FollowingHash(image, plan.size) as hashing:
            copier = Copier(spool, fd)
            try:
                writer = _Writer(fd, geometry, copier, uuid.UUID(fs_uuid).bytes, epoch)
                inodes, blocks = writer.write(tree, uuid.UUID(hash_seed).bytes)
                copier.report(hashing.final)  # the metadata is final: hash behind the copies
            finally:
                copier.close()
            os.fsync(fd)  # the store's fsync before publishing finds nothing left
            return Written(inodes, blocks, hashing.digest())
    except OSError as exc:  # the host's disk: name the file being written
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(image)) from exc
    except ImageFull:
        raise ImageError(
            f"the image of {human(plan.size)} ran out of space (estimated need "
            f"{human(plan.needed)}); increase size",
            reason=Reason.SIZE_TOO_SMALL,
        ) from None
    finally:
        os.close(fd)


def _create(image: Path, size: int) -> int:
    """A sparse file of ``size`` bytes, or ImageError when the host cannot hold one."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(image, flags, 0o644)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        if exc.errno != errno.EFBIG:
            raise
        raise ImageError(
            f"the filesystem holding {image.parent} cannot hold a file of {human(size)} "
            f"({exc.strerror}); use a smaller size",
            reason=Reason.SIZE_TOO_LARGE,
        ) from exc
    return fd


class _Writer:
    def __init__(self, fd: int, geometry: Geometry, copier: Copier, fs_uuid: bytes, epoch: int):
        self.fd = fd
        self.geo = geometry
        # copies the file data from the spool, in image order (the cursor only moves
        # forward, and each file's extents follow logical order), while the
        # metadata is laid out
        self.copier = copier
        self.uuid = fs_uuid
        self.seed = fmt.fs_seed(fs_uuid)
        self.epoch = epoch
        self.alloc = Allocator(geometry)
        groups = geometry.groups
        placed = place_metadata(geometry, self.alloc)
        self.block_bitmaps = placed.block_bitmaps
        self.inode_bitmaps = placed.inode_bitmaps
        self.itables = placed.itables
        self.dirs = [0] * groups
        self._table = bytearray()
        self._table_ino = 0  # the inode number of the table buffer's first inode
        self.max_ino = fmt.FIRST_INO

    # -- the whole image --------------------------------------------------------

    def write(self, tree: Tree, hash_seed: bytes) -> tuple[int, int]:
        """Lay out the image, the file data handed to the copier; (inodes, blocks) in use."""
        journal = self._write_journal()
        resize_block = self.alloc.one()
        added = self._add_lost_found(tree)
        try:
            self._number(tree)
            self._write_tree(tree)
        finally:
            if added:  # the caller's tree is as it was: written again, the same bytes
                assert tree.root.children is not None
                del tree.root.children[LOST_FOUND]
        self._flush_table()
        self._write_resize_inode(resize_block)
        used_blocks = self._write_groups()
        self._write_superblocks(hash_seed, journal, used_blocks)
        return self.max_ino, used_blocks

    def _add_lost_found(self, tree: Tree) -> bool:
        """lost+found as inode 11: the tree's own, or one added for the write (True)."""
        assert tree.root.children is not None
        node = tree.root.children.get(LOST_FOUND)
        added = False
        if node is None:
            node = Node(Inode(DIR, perm=0o700, mtime=self.epoch), children={})
            tree.root.children[LOST_FOUND] = node
            self._lost_found_blocks = LOST_FOUND_BLOCKS
            added = True
        elif not node.is_dir:
            raise ImageError(
                f"/{LOST_FOUND} in the image is not a directory; e2fsck needs it to be one",
                reason=Reason.DEST_INVALID,
            )
        else:
            self._lost_found_blocks = 1
        self._lost_found = node.inode
        return added

    def _number(self, tree: Tree) -> None:
        """Inode numbers in tree order and every inode's count of names."""
        stack = [tree.root]
        while stack:  # reset: a tree may be written twice (check)
            node = stack.pop()
            node.inode.ino = 0
            node.inode.nlink = 0
            if node.children:
                stack.extend(node.children.values())
        tree.root.inode.ino = fmt.ROOT_INO
        self._lost_found.ino = fmt.LOST_FOUND_INO
        next_ino = fmt.FIRST_INO + 1
        for node in tree.nodes():
            inode = node.inode
            if inode.ino == 0:
                inode.ino = next_ino
                next_ino += 1
            inode.nlink += 1
        self.max_ino = next_ino - 1
        if self.max_ino > self.geo.inodes:
            raise ImageFull

    def _write_tree(self, tree: Tree) -> None:
        emitted = bytearray(self.max_ino + 1)
        stack: list[tuple[Node, int]] = [(tree.root, fmt.ROOT_INO)]
        while stack:
            node, parent = stack.pop()
            inode = node.inode
            if emitted[inode.ino]:
                continue
            emitted[inode.ino] = 1
            if node.children is not None:
                names = sorted(node.children, key=name_bytes)
                self._write_dir(node, names, parent)
                stack.extend((node.children[n], inode.ino) for n in reversed(names))
            else:
                self._write_leaf(inode)

    # -- inodes ------------------------------------------------------------------------

    def _put_inode(self, ino: int, raw: bytes) -> None:
        ipg = self.geo.inodes_per_group
        if (
            not self._table
            or ino != self._table_ino + len(self._table) // INODE_SIZE
            or (ino - 1) % ipg == 0
            or len(self._table) >= _FLUSH
        ):
            self._flush_table()
            self._table_ino = ino
        self._table += raw

    def _flush_table(self) -> None:
        if not self._table:
            return
        ipg = self.geo.inodes_per_group
        group, index = divmod(self._table_ino - 1, ipg)
        self._pwrite(self.itables[group] * BLOCK + index * INODE_SIZE, self._table)
        self._table = bytearray()

    def _inode(
        self, inode: Inode, *, size: int, blocks: int, i_block: bytes, flags: int,
        links: int, file_acl: int = 0, xattrs: bytes = b"",
    ) -> None:  # fmt: skip
        raw = fmt.pack_inode(
            ino=inode.ino,
            seed=self.seed,
            mode=inode.mode,
            uid=inode.uid,
            gid=inode.gid,
            size=size,
            times=(inode.mtime, inode.mtime_ns),
            crtime=(self.epoch, 0),
            links=links,
            blocks=blocks * (BLOCK // 512),
            flags=flags,
            i_block=i_block,
            file_acl=file_acl,
            xattrs=xattrs,
        )
        self._put_inode(inode.ino, raw)

    def _xattrs(self, inode: Inode) -> tuple[bytes, int]:
        """(the in-inode xattr area, the xattr block's number or 0)."""
        if not inode.xattrs:
            return b"", 0
        entries = fmt.xattr_entries(inode.xattrs)
        area = fmt.inode_xattrs(entries)
        if area is not None:
            return area, 0
        block = self.alloc.one()
        self._pwrite(block * BLOCK, fmt.xattr_block(entries, block, self.seed))
        return b"", block

    def _write_dir(self, node: Node, names: list[str], parent: int) -> None:
        inode = node.inode
        assert node.children is not None
        xattrs, acl_block = self._xattrs(inode)
        iseed = fmt.inode_seed(self.seed, inode.ino)
        children = node.children
        entries = [(b".", inode.ino, fmt.FT_DIR), (b"..", parent, fmt.FT_DIR)]
        subdirs = 0
        for name in names:
            child = children[name].inode
            entries.append((name_bytes(name), child.ino, _FILE_TYPES[child.type]))
            subdirs += child.type == DIR
        content = _dir_content(entries, iseed)
        count = len(content) // BLOCK
        if inode is self._lost_found:
            for _ in range(count, self._lost_found_blocks):
                content += _empty_dir_block(iseed)
            count = max(count, self._lost_found_blocks)
        extents = self._place(count)
        at = 0
        for _, pblk, length in extents:
            self._pwrite(pblk * BLOCK, content[at * BLOCK : (at + length) * BLOCK])
            at += length
        i_block, tree_blocks = self._extent_tree(extents, inode.ino)
        links = 2 + subdirs
        if links > _MAX_DIR_LINKS:
            links = 1
        self.dirs[(inode.ino - 1) // self.geo.inodes_per_group] += 1
        self._inode(
            inode,
            size=count * BLOCK,
            blocks=count + tree_blocks + (acl_block != 0),
            i_block=i_block,
            flags=fmt.EXTENTS_FL,
            links=links,
            file_acl=acl_block,
            xattrs=xattrs,
        )

    def _write_leaf(self, inode: Inode) -> None:
        xattrs, acl_block = self._xattrs(inode)
        extra = acl_block != 0
        kind = inode.type
        if kind == REG:
            extents: list[Extent] = []
            for first, count in data_runs(inode):
                extents += self._place(count, first)
            self._copy_data(inode, extents)
            i_block, tree_blocks = self._extent_tree(extents, inode.ino)
            blocks = sum(e[2] for e in extents) + tree_blocks + extra
            flags, size = fmt.EXTENTS_FL, inode.size
        elif kind == SYMLINK:
            target = name_bytes(inode.target)
            size = len(target)
            if size <= fmt.FAST_SYMLINK_MAX:
                i_block, blocks, flags = target.ljust(60, b"\0"), int(extra), 0
            else:
                extents = self._place(1)
                self._pwrite(extents[0][1] * BLOCK, target)
                i_block, _ = self._extent_tree(extents, inode.ino)
                blocks, flags = 1 + extra, fmt.EXTENTS_FL
        elif kind in (CHR, BLK):
            i_block, blocks, flags, size = fmt.device_block(*inode.rdev), int(extra), 0, 0
        else:  # fifo
            i_block, blocks, flags, size = bytes(60), int(extra), 0, 0
        self._inode(
            inode,
            size=size,
            blocks=blocks,
            i_block=i_block,
            flags=flags,
            links=inode.nlink,
            file_acl=acl_block,
            xattrs=xattrs,
        )

    # -- blocks ------------------------------------------------------------------------

    def _place(self, count: int, first: int = 0) -> list[Extent]:
        """Allocate ``count`` blocks for logical blocks ``first``...; their extents."""
        extents: list[Extent] = []
        logical = first
        for start, length in self.alloc.runs(count):
            while length > 0:
                n = min(length, fmt.MAX_EXTENT_LEN)
                extents.append((logical, start, n))
                logical += n
                start += n
                length -= n
        return extents

    def _copy_data(self, inode: Inode, extents: list[Extent]) -> None:
        src = inode.src
        i = 0
        for offset, length in data_segments(inode):
            while length > 0:
                lblk, pblk, count = extents[i]
                end = (lblk + count) * BLOCK
                if offset >= end:
                    i += 1
                    continue
                n = min(length, end - offset)
                self.copier.add(src, n, pblk * BLOCK + offset - lblk * BLOCK)
                src += n
                offset += n
                length -= n

    def _extent_tree(self, extents: list[Extent], ino: int) -> tuple[bytes, int]:
        """(i_block: the tree's root, blocks of its other nodes), nodes written."""
        if len(extents) <= fmt.EXTENTS_IN_INODE:
            root = fmt.extent_header(len(extents), fmt.EXTENTS_IN_INODE, 0)
            return (root + fmt.pack_leaf_entries(extents)).ljust(60, b"\0"), 0
        iseed = fmt.inode_seed(self.seed, ino)
        per = fmt.EXTENTS_IN_BLOCK
        blocks = 0
        level: list[tuple[int, int]] = []  # (first logical block, node's block)
        for i in range(0, len(extents), per):
            leaves = extents[i : i + per]
            block = self.alloc.one()
            body = fmt.pack_leaf_entries(leaves)
            self._pwrite(block * BLOCK, fmt.extent_block(body, len(leaves), 0, iseed))
            level.append((leaves[0][0], block))
            blocks += 1
        depth = 1
        while len(level) > fmt.EXTENTS_IN_INODE:
            upper: list[tuple[int, int]] = []
            for i in range(0, len(level), per):
                chunk = level[i : i + per]
                block = self.alloc.one()
                body = fmt.pack_index_entries(chunk)
                self._pwrite(block * BLOCK, fmt.extent_block(body, len(chunk), depth, iseed))
                upper.append((chunk[0][0], block))
                blocks += 1
            level = upper
            depth += 1
        root = fmt.extent_header(len(level), fmt.EXTENTS_IN_INODE, depth)
        return (root + fmt.pack_index_entries(level)).ljust(60, b"\0"), blocks

    def _pwrite(self, offset: int, data: bytes | bytearray) -> None:
        pwrite_all(self.fd, data, offset)

    # -- the filesystem's own inodes --------------------------------------------------

    def _special_inode(
        self, ino: int, *, size: int, blocks: int, i_block: bytes, flags: int
    ) -> None:
        raw = fmt.pack_inode(
            ino=ino,
            seed=self.seed,
            mode=0o100600,
            uid=0,
            gid=0,
            size=size,
            times=(self.epoch, 0),
            crtime=(self.epoch, 0),
            links=1,
            blocks=blocks * (BLOCK // 512),
            flags=flags,
            i_block=i_block,
        )
        group, index = divmod(ino - 1, self.geo.inodes_per_group)
        self._pwrite(self.itables[group] * BLOCK + index * INODE_SIZE, raw)

    def _write_journal(self) -> bytes:
        """The journal (inode 8): an empty jbd2 log. Returns its inode's i_block."""
        count = self.geo.journal
        if not count:
            return b""
        extents = self._place(count)
        self._pwrite(extents[0][1] * BLOCK, fmt.journal_superblock(count, self.uuid))
        i_block, tree_blocks = self._extent_tree(extents, fmt.JOURNAL_INO)
        self._special_inode(
            fmt.JOURNAL_INO,
            size=count * BLOCK,
            blocks=count + tree_blocks,
            i_block=i_block,
            flags=fmt.EXTENTS_FL,
        )
        return i_block

    def _write_resize_inode(self, dind: int) -> None:
        """Inode 7: a double-indirect block listing the reserved descriptor blocks of
        group 0, each listing its copies in the backup groups (as mke2fs makes it)."""
        geo = self.geo
        backups = super_groups(geo.groups)[1:]
        table = bytearray(BLOCK)
        for i in range(geo.reserved_gdt):
            primary = 1 + geo.desc_blocks + i
            struct.pack_into("<I", table, 4 * ((geo.desc_blocks + i) % (BLOCK // 4)), primary)
            copies = b"".join(struct.pack("<I", primary + g * BLOCKS_PER_GROUP) for g in backups)
            self._pwrite(primary * BLOCK, copies)
        self._pwrite(dind * BLOCK, table)
        i_block = bytearray(60)
        struct.pack_into("<I", i_block, 13 * 4, dind)  # EXT2_DIND_BLOCK
        per = BLOCK // 4
        self._special_inode(
            fmt.RESIZE_INO,
            size=(per * per + per + 12) * BLOCK,
            blocks=1 + geo.reserved_gdt * (1 + len(backups)),
            i_block=bytes(i_block),
            flags=0,
        )

    # -- groups and superblocks ---------------------------------------------------------

    def _used_ranges(self) -> list[tuple[int, int]]:
        """Blocks in use as (start, end): the cursor's prefix less skipped runs, and
        the group heads beyond it."""
        cursor = self.alloc.cursor
        ranges: list[tuple[int, int]] = []
        start = 0
        for a, b in self.alloc.skipped:
            ranges.append((start, a))
            start = b
        ranges.append((start, cursor))
        for a, b in self.geo.reserved_regions():
            if b > cursor:
                ranges.append((max(a, cursor), b))
        return [r for r in ranges if r[1] > r[0]]

    def _write_groups(self) -> int:
        geo = self.geo
        ipg = geo.inodes_per_group
        ranges = self._used_ranges()
        descriptors = bytearray()
        total_used = 0
        zero_bitmap_csum = fmt.crc32c(self.seed, bytes(BLOCK))
        r = 0
        for g in range(geo.groups):
            first = g * BLOCKS_PER_GROUP
            size = geo.group_blocks(g)
            bitmap = bytearray(BLOCK)
            used = 0
            while r < len(ranges) and ranges[r][1] <= first:
                r += 1
            k = r
            while k < len(ranges) and ranges[k][0] < first + size:
                a = max(ranges[k][0], first) - first
                b = min(ranges[k][1], first + size) - first
                _set_bits(bitmap, a, b)
                used += b - a
                k += 1
            _set_bits(bitmap, size, BLOCKS_PER_GROUP)  # past the end of the filesystem
            if any(bitmap):
                self._pwrite(self.block_bitmaps[g] * BLOCK, bitmap)
                block_csum = fmt.crc32c(self.seed, bitmap)
            else:
                block_csum = zero_bitmap_csum
            total_used += used
            inodes_used = min(max(self.max_ino - g * ipg, 0), ipg)
            flags = fmt.BG_INODE_ZEROED
            if inodes_used:
                ibitmap = bytearray(BLOCK)
                _set_bits(ibitmap, 0, inodes_used)
                _set_bits(ibitmap, ipg, 8 * BLOCK)
                self._pwrite(self.inode_bitmaps[g] * BLOCK, ibitmap)
                inode_csum = fmt.crc32c(self.seed, ibitmap[: ipg // 8])
            else:
                flags |= 0x1  # EXT4_BG_INODE_UNINIT: never read; the kernel makes it
                inode_csum = fmt.crc32c(self.seed, bytes(ipg // 8))
            descriptors += self._descriptor(
                g,
                free_blocks=size - used,
                free_inodes=ipg - inodes_used,
                dirs=self.dirs[g],
                flags=flags,
                block_csum=block_csum,
                inode_csum=inode_csum,
                unused=ipg - inodes_used,
            )
        descriptors += bytes(-len(descriptors) % BLOCK)
        for g in super_groups(geo.groups):
            self._pwrite((g * BLOCKS_PER_GROUP + 1) * BLOCK, descriptors)
        return total_used

    def _descriptor(
        self, group: int, *, free_blocks: int, free_inodes: int, dirs: int, flags: int,
        block_csum: int, inode_csum: int, unused: int,
    ) -> bytes:  # fmt: skip
        bb, ib, it = self.block_bitmaps[group], self.inode_bitmaps[group], self.itables[group]
        raw = bytearray(
            struct.pack(
                "<IIIHHHHIHHHHIIIHHHHIHHI",
                bb & 0xFFFFFFFF,
                ib & 0xFFFFFFFF,
                it & 0xFFFFFFFF,
                free_blocks & 0xFFFF,
                free_inodes & 0xFFFF,
                dirs & 0xFFFF,
                flags,
                0,  # exclude bitmap
                block_csum & 0xFFFF,
                inode_csum & 0xFFFF,
                unused & 0xFFFF,
                0,  # checksum, below
                bb >> 32,
                ib >> 32,
                it >> 32,
                free_blocks >> 16,
                free_inodes >> 16,
                dirs >> 16,
                unused >> 16,
                0,
                block_csum >> 16,
                inode_csum >> 16,
                0,
            )
        )
        csum = fmt.crc32c(fmt.crc32c(self.seed, struct.pack("<I", group)), raw)
        struct.pack_into("<H", raw, 0x1E, csum & 0xFFFF)
        return bytes(raw)

    def _write_superblocks(self, hash_seed: bytes, journal: bytes, used_blocks: int) -> None:
        geo = self.geo
        sb = bytearray(1024)
        compat = fmt.COMPAT_EXT_ATTR | fmt.COMPAT_RESIZE_INODE | fmt.COMPAT_DIR_INDEX
        if journal:
            compat |= fmt.COMPAT_HAS_JOURNAL
        incompat = (
            fmt.INCOMPAT_FILETYPE | fmt.INCOMPAT_EXTENTS | fmt.INCOMPAT_64BIT | fmt.INCOMPAT_FLEX_BG
        )
        ro_compat = (
            fmt.RO_COMPAT_SPARSE_SUPER
            | fmt.RO_COMPAT_LARGE_FILE
            | fmt.RO_COMPAT_HUGE_FILE
            | fmt.RO_COMPAT_DIR_NLINK
            | fmt.RO_COMPAT_EXTRA_ISIZE
            | fmt.RO_COMPAT_METADATA_CSUM
        )
        free_blocks = geo.blocks - used_blocks
        free_inodes = geo.inodes - self.max_ino
        epoch = min(max(self.epoch, 0), 0xFFFFFFFF)
        struct.pack_into(
            "<IIIIIIIIIIIIIHhHHHHIIIIHHIHH",
            sb,
            0,
            geo.inodes,
            geo.blocks & 0xFFFFFFFF,
            0,  # reserved blocks
            free_blocks & 0xFFFFFFFF,
            free_inodes,
            0,  # first data block
            2,  # log block size: 4 KiB
            2,  # log cluster size
            BLOCKS_PER_GROUP,
            BLOCKS_PER_GROUP,
            geo.inodes_per_group,
            0,  # mtime
            epoch,  # wtime
            0,  # mount count
            -1,  # max mount count
            0xEF53,
            1,  # state: clean
            1,  # errors: continue
            0,  # minor revision
            epoch,  # lastcheck
            0,  # checkinterval
            0,  # creator OS: Linux
            1,  # revision: dynamic
            0,
            0,  # default reserved uid/gid
            fmt.FIRST_INO,
            INODE_SIZE,
            0,  # block group number (set per copy)
        )
        struct.pack_into("<III", sb, 0x5C, compat, incompat, ro_compat)
        sb[0x68:0x78] = self.uuid
        sb[0x78:0x88] = LABEL.ljust(16, b"\0")
        struct.pack_into("<H", sb, 0xCE, geo.reserved_gdt)
        if journal:
            struct.pack_into("<I", sb, 0xE0, fmt.JOURNAL_INO)
        sb[0xEC:0xFC] = hash_seed
        sb[0xFC] = 1  # default hash: half_md4
        sb[0xFD] = 1 if journal else 0  # s_jnl_blocks holds a copy of the journal's i_block
        struct.pack_into("<H", sb, 0xFE, fmt.DESC_SIZE)
        struct.pack_into("<I", sb, 0x100, 0x000C)  # default mount options: user_xattr, acl
        struct.pack_into("<I", sb, 0x108, epoch)  # mkfs time
        if journal:
            size = geo.journal * BLOCK
            sb[0x10C : 0x10C + 60] = journal
            struct.pack_into("<II", sb, 0x10C + 60, size >> 32, size & 0xFFFFFFFF)
        struct.pack_into("<III", sb, 0x150, geo.blocks >> 32, 0, free_blocks >> 32)
        struct.pack_into("<HHI", sb, 0x15C, fmt.EXTRA_ISIZE, fmt.EXTRA_ISIZE, 0x1)  # signed hash
        sb[0x174] = 4  # log groups per flex
        sb[0x175] = 1  # checksum type: crc32c
        for g in super_groups(geo.groups):
            struct.pack_into("<H", sb, 0x5A, g)
            struct.pack_into("<I", sb, 0x3FC, fmt.crc32c(0xFFFFFFFF, sb[:0x3FC]))
            offset = 1024 if g == 0 else g * BLOCKS_PER_GROUP * BLOCK
            self._pwrite(offset, sb)


def _set_bits(bitmap: bytearray, start: int, end: int) -> None:
    """Set bits [start, end) of a little-endian bitmap."""
    if end <= start:
        return
    first_byte, last_byte = start // 8, (end - 1) // 8
    if first_byte == last_byte:
        bitmap[first_byte] |= ((1 << (end - start)) - 1) << (start % 8)
        return
    bitmap[first_byte] |= (0xFF << (start % 8)) & 0xFF
    bitmap[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
    bitmap[last_byte] |= (1 << ((end - 1) % 8 + 1)) - 1


def _dir_content(entries: list[tuple[bytes, int, int]], iseed: int) -> bytearray:
    """Linear directory blocks of (name, inode, file type) entries, '.' and '..' first."""
    room = BLOCK - fmt.DIR_TAIL
    out = bytearray()
    block = bytearray(BLOCK)
    pos = last = 0
    for name, ino, ftype in entries:
        size = fmt.dirent_size(len(name))
        if pos + size > room:
            struct.pack_into("<H", block, last + 4, room - last)
            fmt.dir_tail(block, iseed)
            out += block
            block = bytearray(BLOCK)
            pos = 0
        struct.pack_into("<IHBB", block, pos, ino, size, len(name), ftype)
        block[pos + 8 : pos + 8 + len(name)] = name
        last = pos
        pos += size
    struct.pack_into("<H", block, last + 4, room - last)
    fmt.dir_tail(block, iseed)
    out += block
    return out


def _empty_dir_block(iseed: int) -> bytearray:
    block = bytearray(BLOCK)
    struct.pack_into("<IH", block, 0, 0, BLOCK - fmt.DIR_TAIL)
    fmt.dir_tail(block, iseed)
    return block
