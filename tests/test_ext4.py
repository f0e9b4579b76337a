"""The ext4 writer: sizing, layout, reproducibility, and what e2fsprogs says of it.

e2fsck -fn is the independent checker of every image here (``write_tree``);
debugfs reads them back; resize2fs grows one (the resize inode and the
reserved descriptor blocks are right only if that works).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest

from banger_build import ext4
from banger_build.errors import ImageError, Reason, ToolError, host_error
from banger_build.ext4 import format as fmt
from banger_build.ext4 import layout
from banger_build.run import find_tool
from banger_build.spool import Spool
from banger_build.tree import DIR, REG, Inode, Node, Tree, new_dir
from tests.support.ext4read import fsck, read_at, read_image, sha256_file
from tests.support.image import flatten_layers, write_tree
from tests.support.tarlayer import member, write_layer


def _tree(tmp: Path, files: int = 50, size: int = 10_000) -> tuple[Tree, Spool]:
    layer = write_layer(
        tmp, [member(f"d/f{i}", data=bytes([i % 251 + 1]) * size) for i in range(files)]
    )
    return flatten_layers(tmp, [layer])


def _write(tmp: Path, tree: Tree, spool: Spool, plan: ext4.SizePlan, key: str = "a" * 32) -> Path:
    image = tmp / "img"
    ext4.write_image(
        image,
        tree,
        spool,
        plan,
        fs_uuid=ext4.derived_uuid(key, "fs-uuid"),
        hash_seed=ext4.derived_uuid(key, "hash-seed"),
        epoch=5,
    )
    return image


# -- sizing ----------------------------------------------------------------------------


def test_too_small_explicit_size_names_the_size_needed(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path, files=200, size=100_000)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=False, size=8 << 20)
    assert info.value.reason == Reason.SIZE_TOO_SMALL
    needed = ext4.plan_size(tree, auto=True, size=0).needed
    assert str(needed) in str(info.value) and needed > 20_000_000


def test_auto_size_fits_and_headroom_is_added(tmp_path: Path) -> None:
    tree, spool = _tree(tmp_path, files=300, size=50_000)
    plan = ext4.plan_size(tree, auto=True, size=0)
    bigger = ext4.plan_size(tree, auto=True, size=512 << 20)
    assert bigger.size == layout._round_mib(plan.size + (512 << 20))
    image = write_tree(tmp_path, tree, spool)
    assert image.stat().st_size == plan.size


def test_the_needed_size_builds_and_one_mib_less_is_refused(tmp_path: Path) -> None:
    tree, spool = _tree(tmp_path, files=2000, size=3000)
    needed = ext4.plan_size(tree, auto=True, size=0).needed
    write_tree(tmp_path, tree, spool, auto=False, size=needed)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=False, size=needed - (1 << 20))
    assert info.value.reason == Reason.SIZE_TOO_SMALL


@pytest.mark.parametrize("mib", [0, 5, 6, 7, 115, 120, 125, 130])
def test_auto_and_needed_sizes_build_across_journal_thresholds(tmp_path: Path, mib: int) -> None:
    """The journal grows at 8 MiB and 128 MiB; sizes near the steps must fit."""
    layer = write_layer(tmp_path, [member("f", data=b"\x01" * (mib << 20))], "none")
    tree, spool = flatten_layers(tmp_path, [layer])
    auto = ext4.plan_size(tree, auto=True, size=0)
    write_tree(tmp_path, tree, spool, name="auto")
    write_tree(tmp_path, tree, spool, auto=False, size=auto.needed, name="needed")


def test_same_inputs_give_the_same_bytes_and_key_changes_uuid(tmp_path: Path) -> None:
    digests = []
    for run, key in enumerate(["c" * 32, "c" * 32, "d" * 32]):
        d = tmp_path / str(run)
        d.mkdir()
        tree, spool = _tree(d, files=20)
        digests.append(sha256_file(write_tree(d, tree, spool, key=key)))
    assert digests[0] == digests[1] != digests[2]


def test_derived_uuid_is_stable_valid_and_nonzero() -> None:
    u = ext4.derived_uuid("e" * 32, "fs-uuid")
    assert u == ext4.derived_uuid("e" * 32, "fs-uuid") != ext4.derived_uuid("e" * 32, "hash-seed")
    assert u[14] == "4" and u != "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize("size", [8_000_000 << 40, ext4.MAX_SIZE + 4096, 1 << 62])
def test_sizes_past_ext4_are_refused_at_once(tmp_path: Path, size: int) -> None:
    tree, _ = _tree(tmp_path, files=3)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=False, size=size)
    assert info.value.reason == Reason.SIZE_TOO_LARGE and "16TiB less 4KiB" in str(info.value)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=True, size=size)  # as auto's headroom
    assert info.value.reason == Reason.SIZE_TOO_LARGE


def test_the_largest_size_is_planned(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path, files=3)
    plan = ext4.plan_size(tree, auto=False, size=ext4.MAX_SIZE)
    assert plan.size == ext4.MAX_SIZE and plan.inodes < 2**32
    geometry = layout.Geometry.make(plan.size, plan.inodes)
    assert geometry.inodes < 2**32 and geometry.blocks <= 2**32 - 1


def test_backup_groups_match_the_definition() -> None:
    def is_backup(g: int) -> bool:
        return g in (0, 1) or any(base**k == g for base in (3, 5, 7) for k in range(1, 40))

    for groups in (*range(1, 800), 2187, 2188, 3125, 3126, 16807, 16808, 131072):
        expected = [g for g in range(groups) if is_backup(g)]
        assert layout.super_groups(groups) == expected, groups
    assert all(layout.has_super(g) == is_backup(g) for g in range(5000))


@pytest.mark.parametrize("mib", [1, 8, 129, 1024 + 3, 5 * 1024])
def test_empty_trees_at_many_sizes_pass_e2fsck(tmp_path: Path, mib: int) -> None:
    """One group, the journal's first step, several groups with backups, a last
    group too small to keep, and 40 groups with a journal split around backups."""
    tree, spool = _tree(tmp_path, files=1)
    image = write_tree(tmp_path, tree, spool, auto=False, size=mib << 20)
    assert image.stat().st_size == mib << 20


def test_resize2fs_grows_an_image_through_its_reserved_descriptors(tmp_path: Path) -> None:
    tree, spool = _tree(tmp_path, files=30)
    image = write_tree(tmp_path, tree, spool, auto=False, size=64 << 20)
    os.truncate(image, 3 << 30)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    grown = subprocess.run(["resize2fs", str(image)], capture_output=True, env=env, check=False)
    assert grown.returncode == 0, grown.stderr.decode()
    result = fsck(image)
    assert result.returncode == 0, result.stdout.decode()
    assert read_image(image)["d/f7"].size == 10_000


# -- what the writer lays out ----------------------------------------------------------


def test_large_directories_files_and_extent_trees(tmp_path: Path) -> None:
    """A directory of many blocks, a file of several 128 MiB extents' worth of
    holes and data, and a file of 2,000 data runs (an extent tree two levels deep)."""
    spool = Spool(tmp_path / "spool")
    tree = Tree()
    assert tree.root.children is not None
    wide = new_dir()
    tree.root.children["wide"] = wide
    assert wide.children is not None
    for i in range(3000):
        wide.children[f"entry-{i:05d}-" + "x" * (i % 60)] = Node(Inode(REG))
    runs = Inode(REG, size=2000 * 8192)
    spool.add(runs, ((i * 8192, b"%06d" % i) for i in range(2000)))
    tree.root.children["runs"] = Node(runs)
    big = Inode(REG, size=300 << 20)
    spool.add(big, [(0, b"start"), ((300 << 20) - 3, b"end")])
    tree.root.children["big"] = Node(big)
    image = write_tree(tmp_path, tree, spool)
    seen = read_image(image, contents=False)
    assert sum(1 for p in seen if p.startswith("wide/")) == 3000
    assert read_at(image, "runs", 1999 * 8192, 6) == b"001999"
    assert read_at(image, "runs", 1234 * 8192 + 100, 4) == bytes(4)
    assert read_at(image, "big", (300 << 20) - 3, 3) == b"end"
    stat = subprocess.run(
        ["debugfs", "-R", "stat /runs", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert (
        "Level Entries"
        in subprocess.run(
            ["debugfs", "-R", "dump_extents /runs", str(image)], capture_output=True, text=True
        ).stdout
    )
    assert "EXTENTS" in stat


def test_inode_numbers_follow_the_tree_and_hard_links_share_them(tmp_path: Path) -> None:
    members = [member(f"d{i}/f{j}", data=b"%d" % j) for i in range(6) for j in range(i * 3)]
    members.append(member("d5/link", "hardlink", linkname="d5/f0"))
    tree, spool = flatten_layers(tmp_path, [write_layer(tmp_path, members)])
    seen = read_image(write_tree(tmp_path, tree, spool))
    for path, node in tree.walk():
        assert seen[path].ino == node.inode.ino, path
    assert seen["d5/link"].ino == seen["d5/f0"].ino and seen["d5/f0"].links == 2
    assert seen["lost+found"].ino == 11 and seen[""].ino == 2
    numbers = [seen[p].ino for p, _ in tree.walk() if p not in ("", "lost+found", "d5/link")]
    assert numbers == sorted(numbers) and numbers[0] == 12  # tree order, from 12 on


def test_a_lost_and_found_from_the_layers_is_used_and_a_file_there_refused(
    tmp_path: Path,
) -> None:
    layer = write_layer(tmp_path, [member("lost+found", "dir", mode=0o700), member("lost+found/x")])
    tree, spool = flatten_layers(tmp_path / "a", [layer])
    seen = read_image(write_tree(tmp_path / "a", tree, spool))
    assert seen["lost+found"].ino == 11 and "lost+found/x" in seen
    bad = write_layer(tmp_path, [member("lost+found", data=b"not a dir")])
    tree, spool = flatten_layers(tmp_path / "b", [bad])
    with pytest.raises(ImageError) as info:
        write_tree(tmp_path / "b", tree, spool)
    assert "lost+found" in str(info.value)


# -- the host --------------------------------------------------------------------------


def test_an_image_file_the_host_cannot_hold_is_an_image_error(tmp_path: Path) -> None:
    """EFBIG (here from RLIMIT_FSIZE, as a host filesystem with a small file size limit)."""
    tree, spool = _tree(tmp_path, files=3)
    plan = ext4.plan_size(tree, auto=False, size=2 << 30)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, hard))
    try:
        with pytest.raises(ImageError) as info:
            _write(tmp_path, tree, spool, plan)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.reason == Reason.SIZE_TOO_LARGE and "File too large" in str(info.value)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a host disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_the_host_disk_filling_up_is_the_hosts_error_naming_the_image(
    tmp_path: Path, small_disk: Path
) -> None:
    layer = write_layer(tmp_path, [member(f"f{i}", data=os.urandom(1 << 20)) for i in range(20)])
    tree, spool = flatten_layers(tmp_path, [layer])
    plan = ext4.plan_size(tree, auto=True, size=0)
    with pytest.raises(OSError) as info:
        _write(small_disk, tree, spool, plan)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(small_disk / "img")
    error = host_error("write filesystem", info.value)
    assert error.reason == Reason.DISK_FULL and str(small_disk / "img") in str(error)


def test_an_image_too_small_for_the_tree_says_so(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [member(f"f{i}", data=os.urandom(500_000)) for i in range(40)])
    tree, spool = flatten_layers(tmp_path, [layer])
    plan = ext4.SizePlan(size=8 << 20, inodes=1024, needed=32 << 20)  # past plan_size's check
    with pytest.raises(ImageError) as info:
        _write(tmp_path, tree, spool, plan)
    assert info.value.reason == Reason.SIZE_TOO_SMALL and "increase size" in str(info.value)


# -- e2fsck's verdicts ------------------------------------------------------------------


def _built(tmp: Path) -> Path:
    tree, spool = _tree(tmp, files=5)
    return write_tree(tmp, tree, spool)


def test_a_damaged_image_is_found_by_e2fsck(tmp_path: Path) -> None:
    image = _built(tmp_path)
    subprocess.run(
        ["debugfs", "-w", "-R", "sif <2> links_count 9", str(image)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ImageError) as info:
        ext4.check_filesystem(image)
    assert info.value.reason == Reason.FSCK_FAILED and "found problems" in str(info.value)


def test_e2fsck_unable_to_check_is_not_a_verdict_on_the_image(tmp_path: Path) -> None:
    garbage = tmp_path / "img"
    garbage.write_bytes(bytes(1 << 20))
    with pytest.raises(ToolError) as info:
        ext4.check_filesystem(garbage)
    assert "could not check" in str(info.value) and "found problems" not in str(info.value)


def test_e2fsck_killed_by_a_signal_is_not_a_verdict_on_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _built(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "e2fsck"
    fake.write_text("#!/bin/sh\nkill -KILL $$\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    find_tool.cache_clear()
    try:
        with pytest.raises(ToolError) as info:
            ext4.check_filesystem(image)
    finally:
        find_tool.cache_clear()
    assert "killed by SIGKILL" in str(info.value) and "found problems" not in str(info.value)


def test_directories_count_their_subdirectories(tmp_path: Path) -> None:
    tree, spool = _tree(tmp_path, files=2)
    assert tree.root.children is not None
    for i in range(5):
        tree.root.children[f"sub{i}"] = Node(Inode(DIR), children={})
    seen = read_image(write_tree(tmp_path, tree, spool))
    assert seen[""].links == 2 + 5 + 2  # sub0..4, d, lost+found


def test_crc32c_is_the_packages_without_its_init() -> None:
    """format loads crc32c's extension by itself (the package's __init__ reads its
    installed metadata): the same function, CRC32C's check value included."""
    assert ~fmt.crc32c(0xFFFFFFFF, b"123456789") & 0xFFFFFFFF == 0xE3069283
    for n in (0, 1, 7, 4096, 100_003):
        data = os.urandom(n)
        seed = int.from_bytes(os.urandom(4), "little")
        expected = ~crc32c.crc32c(data, value=~seed & 0xFFFFFFFF) & 0xFFFFFFFF
        assert fmt.crc32c(seed, data) == expected
    code = "import sys, banger_build.ext4.format; print('importlib.metadata' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
