"""Where everything goes: the geometry of an image of a given size, the
block allocator, and the sizing that finds the smallest image a tree fits.

The layout is fixed by (size, inode count) alone. Group 0 and the backup
groups (1 and the powers of 3, 5 and 7, ``sparse_super``) start with a
superblock, the group descriptors and the blocks reserved for growing them
(``resize_inode``). Everything else is allocated by one cursor from the end
of group 0's reserved blocks, skipping the backup groups' ones: the bitmaps
and inode tables of every group (``flex_bg`` lets them live anywhere), the
journal, the resize inode's block, then the tree's blocks in tree order.
Nothing is ever freed, so the used blocks are the cursor's prefix (less the
few blocks an inode table skipped to stay contiguous) plus the reserved
regions beyond it: the bitmaps are ranges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from banger_build.errors import ImageError, Reason
from banger_build.ext4.format import (
    BLOCK,
    BLOCKS_PER_GROUP,
    DESC_SIZE,
    DIR_TAIL,
    EXTENTS_IN_BLOCK,
    EXTENTS_IN_INODE,
    FAST_SYMLINK_MAX,
    FIRST_INO,
    INODE_SIZE,
    MAX_EXTENT_LEN,
    dirent_size,
    fits_in_block,
    inode_xattrs,
    xattr_entries,
)
from banger_build.tree import REG, SYMLINK, Inode, Tree, name_bytes

MiB = 1 << 20
#: The largest image: 2^32 - 1 blocks of 4 KiB (16 TiB less 4 KiB), so block
#: numbers fit the 32-bit fields the resize inode keeps.
MAX_SIZE = (2**32 - 1) * BLOCK
#: Bytes of image per inode (mke2fs's ``inode_ratio``): room for the guest's own files.
INODE_RATIO = 16384
MAX_INODES_PER_GROUP = 8 * BLOCK
#: The smallest image: one group's superblock, descriptors, bitmaps and a few tables.
MIN_BLOCKS = 64


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def has_super(group: int) -> bool:
    """Does ``group`` hold a superblock copy (sparse_super): 0, 1, powers of 3, 5, 7."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


def super_groups(groups: int) -> list[int]:
    """The groups below ``groups`` holding a superblock, in order."""
    found = {0, 1} if groups > 1 else {0}
    for base in (3, 5, 7):
        n = base
        while n < groups:
            found.add(n)
            n *= base
    return sorted(found)


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


@dataclass(frozen=True)
class Geometry:
    blocks: int  # the filesystem's blocks (the image file may be a little longer)
    groups: int
    inodes_per_group: int
    desc_blocks: int
    reserved_gdt: int
    journal: int  # blocks; 0: no journal (images under 8 MiB, as mke2fs)

    @classmethod
    def make(cls, size: int, inodes: int) -> Geometry:
        blocks = max(size // BLOCK, MIN_BLOCKS)
        while True:
            groups = _ceil(blocks, BLOCKS_PER_GROUP)
            desc_blocks = _ceil(groups * DESC_SIZE, BLOCK)
            reserved = _reserved_gdt(blocks, desc_blocks)
            last = blocks - (groups - 1) * BLOCKS_PER_GROUP
            head = 1 + desc_blocks + reserved if has_super(groups - 1) else 0
            if groups > 1 and last < head + MIN_BLOCKS:
                blocks -= last  # too small to be a group (mke2fs drops it too)
                continue
            break
        per_group = _ceil(_ceil(max(inodes, 1), groups), 16) * 16  # whole table blocks
        per_group = min(max(per_group, 16), MAX_INODES_PER_GROUP)
        return cls(blocks, groups, per_group, desc_blocks, reserved, journal_blocks(blocks))

    @property
    def inodes(self) -> int:
        return self.groups * self.inodes_per_group

    @property
    def itable_blocks(self) -> int:
        return self.inodes_per_group * INODE_SIZE // BLOCK

    def group_blocks(self, group: int) -> int:
        return min(BLOCKS_PER_GROUP, self.blocks - group * BLOCKS_PER_GROUP)

    def head(self, group: int) -> int:
        """Blocks at the start of ``group`` holding a superblock copy and descriptors."""
        return 1 + self.desc_blocks + self.reserved_gdt if has_super(group) else 0

    def reserved_regions(self) -> list[tuple[int, int]]:
        """(start, end) of every group head, in order."""
        return [
            (g * BLOCKS_PER_GROUP, g * BLOCKS_PER_GROUP + self.head(g))
            for g in super_groups(self.groups)
        ]


def _reserved_gdt(blocks: int, desc_blocks: int) -> int:
    """mke2fs's ``calc_reserved_gdt_blocks``: room to grow to 1024x, up to 2^32 blocks."""
    max_blocks = blocks * 1024 if blocks < 0xFFFFFFFF // 1024 else 0xFFFFFFFF
    groups = _ceil(max_blocks, BLOCKS_PER_GROUP)
    return max(0, min(_ceil(groups, BLOCK // DESC_SIZE) - desc_blocks, BLOCK // 4))


class ImageFull(Exception):
    """The allocator ran past the end of the filesystem."""


class Allocator:
    """One cursor over the blocks, skipping the group heads. ``skipped`` keeps the
    free runs an unsplittable allocation jumped over."""

    def __init__(self, geometry: Geometry) -> None:
        self.blocks = geometry.blocks
        self._regions = geometry.reserved_regions()
        self._next_region = 1
        self.cursor = self._regions[0][1]
        self.skipped: list[tuple[int, int]] = []

    def _region_ahead(self) -> tuple[int, int] | None:
        """The next group head, once the cursor is past any head it stands on."""
        while self._next_region < len(self._regions):
            region = self._regions[self._next_region]
            if self.cursor < region[0]:
                return region
            self.cursor = max(self.cursor, region[1])
            self._next_region += 1
        return None

    def runs(self, count: int) -> list[tuple[int, int]]:
        """``count`` blocks as (start, length) runs, in order."""
        out: list[tuple[int, int]] = []
        while count > 0:
            region = self._region_ahead()
            limit = region[0] if region is not None else self.blocks
            take = min(count, limit - self.cursor)
            if take <= 0:
                raise ImageFull
            out.append((self.cursor, take))
            self.cursor += take
            count -= take
        return out

    def tables(self, count: int, size: int) -> list[int]:
        """``count`` runs of ``size`` blocks each in one piece (inode tables), their
        first blocks. A table that would cross a group head starts after it; the
        blocks jumped over are ``skipped``. O(group heads), not O(count)."""
        starts: list[int] = []
        while len(starts) < count:
            region = self._region_ahead()
            limit = region[0] if region is not None else self.blocks
            n = min(count - len(starts), (limit - self.cursor) // size)
            starts.extend(range(self.cursor, self.cursor + n * size, size))
            self.cursor += n * size
            if len(starts) < count:
                if region is None:
                    raise ImageFull
                if self.cursor < region[0]:
                    self.skipped.append((self.cursor, region[0]))
                self.cursor = region[1]
                self._next_region += 1
        return starts

    def blocks_of(self, count: int) -> list[int]:
        """``count`` single blocks (bitmaps), in order."""
        return [b for start, n in self.runs(count) for b in range(start, start + n)]

    def one(self) -> int:
        return self.runs(1)[0][0]

    def free(self) -> int:
        """Blocks still to be had: past the cursor, less the group heads there."""
        heads = sum(e - s for s, e in self._regions[self._next_region :] if s >= self.cursor)
        return self.blocks - self.cursor - heads


@dataclass(frozen=True)
class Placement:
    """Where the groups' bitmaps and inode tables are: the first allocations."""

    block_bitmaps: list[int]
    inode_bitmaps: list[int]
    itables: list[int]


def place_metadata(geometry: Geometry, alloc: Allocator) -> Placement:
    """Bitmaps then inode tables, for every group, from the allocator's cursor (the
    writer and ``fits`` both place them so, so sizing counts what is skipped)."""
    groups = geometry.groups
    return Placement(
        alloc.blocks_of(groups),
        alloc.blocks_of(groups),
        alloc.tables(groups, geometry.itable_blocks),
    )


# -- what the tree needs ---------------------------------------------------------


def dir_block_count(name_lengths: Iterable[int]) -> int:
    """Blocks of a linear directory: '.' and '..' then each entry, never across a
    block, each block ending with the 12-byte checksum tail."""
    room = BLOCK - DIR_TAIL
    used = 24  # '.' and '..'
    blocks = 1
    for n in name_lengths:
        size = dirent_size(n)
        if used + size > room:
            blocks += 1
            used = 0
        used += size
    return blocks


def data_runs(inode: Inode) -> list[tuple[int, int]]:
    """(first logical block, blocks) of each run of a regular file holding data."""
    if inode.segments is None:
        return [(0, _ceil(inode.size, BLOCK))] if inode.size else []
    runs: list[tuple[int, int]] = []
    s = inode.segments
    for i in range(0, len(s), 2):
        first = s[i] // BLOCK
        end = _ceil(s[i] + s[i + 1], BLOCK)
        if runs and first <= runs[-1][0] + runs[-1][1]:
            start = runs[-1][0]
            runs[-1] = (start, max(end, start + runs[-1][1]) - start)
        else:
            runs.append((first, end - first))
    return runs


def index_blocks(extents: int) -> int:
    """Extent tree blocks beyond the 4 entries the inode holds."""
    total = 0
    nodes = extents
    while nodes > EXTENTS_IN_INODE:
        nodes = _ceil(nodes, EXTENTS_IN_BLOCK)
        total += nodes
    return total


def extent_count(runs: list[tuple[int, int]]) -> int:
    return sum(_ceil(n, MAX_EXTENT_LEN) for _, n in runs)


def xattr_block_needed(inode: Inode) -> bool:
    if not inode.xattrs:
        return False
    entries = xattr_entries(inode.xattrs)
    if inode_xattrs(entries) is not None:
        return False
    if not fits_in_block(entries):
        raise ImageError("xattrs larger than one xattr block", reason=Reason.XATTR_TOO_LARGE)
    return True


@dataclass(frozen=True)
class Usage:
    blocks: int  # the tree's blocks: directories, data, extent trees, xattr blocks
    inodes: int  # the tree's inodes, lost+found included


def tree_usage(tree: Tree) -> Usage:
    blocks = 0
    inodes = 0
    has_lost_found = LOST_FOUND in (tree.root.children or {})
    seen: set[int] = set()
    for node in tree.nodes():
        inode = node.inode
        if inode.nlink > 1:
            if id(inode) in seen:
                continue
            seen.add(id(inode))
        inodes += 1
        n = 0
        if node.children is not None:
            # packed in the writer's order (byte order of the names): another order
            # can take another number of blocks
            names = [name_bytes(c) for c in node.children]
            if node is tree.root and not has_lost_found:
                names.append(LOST_FOUND.encode())
            n = dir_block_count(len(b) for b in sorted(names))
            count = _ceil(n, MAX_EXTENT_LEN)
        elif inode.type == REG:
            runs = data_runs(inode)
            n = sum(r[1] for r in runs)
            count = extent_count(runs)
        elif inode.type == SYMLINK and inode.size > FAST_SYMLINK_MAX:
            n = count = 1
        else:
            count = 0
        blocks += n + index_blocks(count) + xattr_block_needed(inode)
    if not has_lost_found:
        inodes += 1
        blocks += LOST_FOUND_BLOCKS
    return Usage(blocks, inodes)


LOST_FOUND = "lost+found"
#: mke2fs makes lost+found 16 KiB, so e2fsck can reconnect files without allocating.
LOST_FOUND_BLOCKS = 4


# -- sizing ------------------------------------------------------------------------


@dataclass(frozen=True)
class SizePlan:
    size: int  # bytes of the image file
    inodes: int  # inodes asked for (the geometry rounds up to whole table blocks)
    needed: int  # the smallest size that holds the tree


def inode_count(tree_inodes: int, size: int) -> int:
    """Inodes of an image: the tree's and a quarter more, or one per INODE_RATIO."""
    used = tree_inodes + FIRST_INO
    return max(used + used // 4 + 256, size // INODE_RATIO)


def fits(usage: Usage, size: int) -> bool:
    """Does an image of ``size`` bytes hold the tree? The groups' metadata is placed
    as the writer places it (inode tables skip ahead of group heads); the rest is
    counted exactly, but for extents split by a group head, which may each cost an
    extent block more (two per head, at most)."""
    geometry = Geometry.make(size, inode_count(usage.inodes, size))
    if geometry.inodes < usage.inodes + FIRST_INO or geometry.inodes >= 2**32:
        return False
    alloc = Allocator(geometry)
    try:
        place_metadata(geometry, alloc)
    except ImageFull:
        return False
    heads = len(geometry.reserved_regions())
    journal = geometry.journal
    if journal:  # its extents: 32768 blocks each, split by heads; their tree
        journal += index_blocks(_ceil(journal, MAX_EXTENT_LEN) + heads)
    need = journal + 1 + usage.blocks + 2 * heads  # 1: the resize inode's block
    return need <= alloc.free()


def _round_mib(n: int) -> int:
    return _ceil(n, MiB) * MiB


def _smallest_fitting(usage: Usage, start: int) -> int:
    """The smallest size from ``start`` on (in ~1% steps) that holds the tree."""
    size = _round_mib(max(start, MiB))
    while size <= MAX_SIZE and not fits(usage, size):
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
    usage = tree_usage(tree)
    if not auto and size > MAX_SIZE:
        raise ImageError(
            f"the size {human(size)} is larger than {MAX_SIZE} bytes (16TiB less 4KiB), the "
            "largest ext4 image banger-build makes",
            reason=Reason.SIZE_TOO_LARGE,
        )
    needed = _smallest_fitting(usage, usage.blocks * BLOCK)
    if auto:
        final = _smallest_fitting(usage, needed + needed // 10 + size)
    else:
        final = size
        if not fits(usage, final):
            raise ImageError(
                f"the size {human(final)} is too small: the image needs at least "
                f'{human(needed)} ({needed} bytes); use size = "auto" or a larger size',
                reason=Reason.SIZE_TOO_SMALL,
            )
    return SizePlan(size=final, inodes=inode_count(usage.inodes, final), needed=needed)


def human(n: int) -> str:
    """Bytes for a message: the largest exact binary unit, else rounded up to MiB."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    if n >= MiB:
        return f"{math.ceil(n / MiB)}MiB"
    return f"{n}B"
