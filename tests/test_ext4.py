"""Sizing, mkfs parameters and reproducibility of the ext4 stage."""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger_build import ext4
from banger_build.errors import ImageError, ToolError
from banger_build.flatten import Flattener
from banger_build.run import find_tool
from banger_build.tree import FIFO, Inode, Node
from tests.support.ext4read import read_image, sha256_file
from tests.support.tarlayer import member, write_layer


def _tree(tmp: Path, files: int = 50, size: int = 10_000):  # type: ignore[no-untyped-def]
    layer = write_layer(tmp, [member(f"d/f{i}", data=bytes(size)) for i in range(files)])
    f = Flattener(tmp / "staging", 1)
    f.apply(layer)
    return f.tree, tmp / "staging"


def test_too_small_explicit_size_names_the_size_needed(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path, files=200, size=100_000)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=False, size=8 << 20)
    assert info.value.reason == "size-too-small"
    needed = ext4.plan_size(tree, auto=True, size=0).needed
    assert str(needed) in str(info.value) and needed > 20_000_000


def test_auto_size_fits_and_headroom_is_added(tmp_path: Path) -> None:
    tree, staging = _tree(tmp_path, files=300, size=50_000)
    plan = ext4.plan_size(tree, auto=True, size=0)
    bigger = ext4.plan_size(tree, auto=True, size=512 << 20)
    assert bigger.size == ext4._round_mib(plan.size + (512 << 20))
    image = tmp_path / "img"
    (tmp_path / "w").mkdir()
    ext4.make_filesystem(image, staging, plan, key="a" * 32, epoch=5, workdir=tmp_path / "w")
    ext4.check_filesystem(image)
    assert image.stat().st_size == plan.size  # the whole file, not 1/4 of it


def test_exact_needed_size_builds(tmp_path: Path) -> None:
    tree, staging = _tree(tmp_path, files=2000, size=3000)
    needed = ext4.plan_size(tree, auto=True, size=0).needed
    plan = ext4.plan_size(tree, auto=False, size=needed)
    (tmp_path / "w").mkdir()
    ext4.make_filesystem(
        tmp_path / "img", staging, plan, key="b" * 32, epoch=5, workdir=tmp_path / "w"
    )
    ext4.check_filesystem(tmp_path / "img")


def test_same_inputs_give_the_same_bytes_and_key_changes_uuid(tmp_path: Path) -> None:
    digests = []
    for run, key in enumerate(["c" * 32, "c" * 32, "d" * 32]):
        d = tmp_path / str(run)
        d.mkdir()
        tree, staging = _tree(d, files=20)
        plan = ext4.plan_size(tree, auto=True, size=0)
        (d / "w").mkdir()
        ext4.make_filesystem(d / "img", staging, plan, key=key, epoch=7, workdir=d / "w")
        digests.append(sha256_file(d / "img"))
    assert digests[0] == digests[1] != digests[2]


def test_derived_uuid_is_stable_valid_and_nonzero() -> None:
    u = ext4.derived_uuid("e" * 32, "fs-uuid")
    assert u == ext4.derived_uuid("e" * 32, "fs-uuid") != ext4.derived_uuid("e" * 32, "hash-seed")
    assert u[14] == "4" and u != "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize("mib", [0, 5, 6, 7, 115, 120, 125])
def test_auto_and_needed_sizes_build_across_journal_thresholds(tmp_path: Path, mib: int) -> None:
    """mke2fs's journal jumps at 8 MiB and 128 MiB: sizes near them must still fit."""
    layer = write_layer(tmp_path, [member("f", data=bytes(mib << 20))], "none")
    f = Flattener(tmp_path / "staging", 1)
    f.apply(layer)
    (tmp_path / "w").mkdir()
    auto = ext4.plan_size(f.tree, auto=True, size=0)
    for i, plan in enumerate((auto, ext4.plan_size(f.tree, auto=False, size=auto.needed))):
        image = tmp_path / f"img{i}"
        ext4.make_filesystem(
            image, tmp_path / "staging", plan, key="f" * 32, epoch=5, workdir=tmp_path / "w"
        )
        ext4.check_filesystem(image)


# -- sizes at and past what ext4 holds -----------------------------------------------


@pytest.mark.parametrize("size", [8_000_000 << 40, ext4.MAX_SIZE + 4096, 1 << 62])
def test_sizes_past_ext4_are_refused_at_once(tmp_path: Path, size: int) -> None:
    """8000000TiB used to spin for hours counting backup groups one by one."""
    tree, _ = _tree(tmp_path, files=3)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=False, size=size)
    assert info.value.reason == "size-too-large" and "16TiB less 4KiB" in str(info.value)
    with pytest.raises(ImageError) as info:
        ext4.plan_size(tree, auto=True, size=size)  # as auto's headroom
    assert info.value.reason == "size-too-large"


def test_the_largest_size_is_planned(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path, files=3)
    plan = ext4.plan_size(tree, auto=False, size=ext4.MAX_SIZE)
    assert plan.size == ext4.MAX_SIZE and plan.inodes < 2**32


def test_backup_groups_in_closed_form_match_the_definition() -> None:
    def is_backup(g: int) -> bool:
        return g in (0, 1) or any(base**k == g for base in (3, 5, 7) for k in range(1, 40))

    for groups in (*range(1, 800), 2187, 2188, 3125, 3126, 16807, 16808, 131072):
        expected = sum(1 for g in range(groups) if is_backup(g))
        assert ext4.backup_groups(groups) == expected, groups


def test_an_image_file_the_host_cannot_hold_is_an_image_error(tmp_path: Path) -> None:
    """EFBIG (here from RLIMIT_FSIZE, as a host filesystem with a small file size limit)."""
    tree, staging = _tree(tmp_path, files=3)
    plan = ext4.plan_size(tree, auto=False, size=2 << 30)
    (tmp_path / "w").mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, hard))
    try:
        with pytest.raises(ImageError) as info:
            ext4.make_filesystem(
                tmp_path / "img", staging, plan, key="a" * 32, epoch=5, workdir=tmp_path / "w"
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.reason == "size-too-large" and "File too large" in str(info.value)


# -- mkfs out of space: the image, or the host's disk ------------------------------------


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


def test_the_host_disk_filling_up_is_not_blamed_on_the_image(
    tmp_path: Path, small_disk: Path
) -> None:
    layer = write_layer(tmp_path, [member(f"f{i}", data=os.urandom(1 << 20)) for i in range(20)])
    f = Flattener(tmp_path / "staging", 1)
    f.apply(layer)
    plan = ext4.plan_size(f.tree, auto=True, size=0)
    with pytest.raises(ImageError) as info:
        ext4.make_filesystem(
            small_disk / "img",
            tmp_path / "staging",
            plan,
            key="a" * 32,
            epoch=5,
            workdir=small_disk,
        )
    assert info.value.reason == "host-disk-full"
    assert str(small_disk) in str(info.value) and "increase size" not in str(info.value)


def test_an_image_too_small_for_mkfs_says_so(tmp_path: Path) -> None:
    layer = write_layer(tmp_path, [member(f"f{i}", data=os.urandom(500_000)) for i in range(40)])
    Flattener(tmp_path / "staging", 1).apply(layer)
    staging = tmp_path / "staging"
    plan = ext4.SizePlan(size=8 << 20, inodes=1024, needed=32 << 20)  # past plan_size's check
    (tmp_path / "w").mkdir()
    with pytest.raises(ImageError) as info:
        ext4.make_filesystem(
            tmp_path / "img", staging, plan, key="a" * 32, epoch=5, workdir=tmp_path / "w"
        )
    assert info.value.reason == "size-too-small" and "increase size" in str(info.value)


# -- e2fsck's verdicts ------------------------------------------------------------------------


def _built(tmp: Path) -> Path:
    tree, staging = _tree(tmp, files=5)
    plan = ext4.plan_size(tree, auto=True, size=0)
    (tmp / "w").mkdir()
    image = tmp / "img"
    ext4.make_filesystem(image, staging, plan, key="a" * 32, epoch=5, workdir=tmp / "w")
    return image


def test_a_damaged_image_is_found_by_e2fsck(tmp_path: Path) -> None:
    image = _built(tmp_path)
    subprocess.run(
        ["debugfs", "-w", "-R", "sif <2> links_count 9", str(image)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ImageError) as info:
        ext4.check_filesystem(image)
    assert info.value.reason == "fsck-failed" and "found problems" in str(info.value)


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


# -- debugfs scripts ----------------------------------------------------------------------------


def test_an_unsafe_debugfs_script_is_an_image_error_not_a_crash(tmp_path: Path) -> None:
    """Names are checked when layers are flattened; a name that still slips into the
    tree (a bug) ends the build with one line."""
    tree, staging = _tree(tmp_path, files=2)
    plan = ext4.plan_size(tree, auto=True, size=0)
    (tmp_path / "w").mkdir()
    image = tmp_path / "img"
    ext4.make_filesystem(image, staging, plan, key="a" * 32, epoch=5, workdir=tmp_path / "w")
    ext4.assign_inodes(image, tree, epoch=5)
    assert tree.root.children is not None
    tree.root.children["evil\nname"] = Node(Inode(FIFO))
    with pytest.raises(ImageError) as info:
        ext4.make_special_nodes(image, tree, epoch=5)
    assert "debugfs script" in str(info.value)


def test_directory_listings_are_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many directories (and one larger than a batch) get their inode numbers right
    over several debugfs runs."""
    monkeypatch.setattr(ext4, "_LIST_BATCH", 7)
    members = [member(f"d{i}/f{j}", data=b"%d" % j) for i in range(6) for j in range(i * 3)]
    layer = write_layer(tmp_path, members)
    f = Flattener(tmp_path / "staging", 1)
    f.apply(layer)
    plan = ext4.plan_size(f.tree, auto=True, size=0)
    (tmp_path / "w").mkdir()
    image = tmp_path / "img"
    ext4.make_filesystem(
        image, tmp_path / "staging", plan, key="a" * 32, epoch=5, workdir=tmp_path / "w"
    )
    extra = ext4.assign_inodes(image, f.tree, epoch=5)
    ext4.apply_metadata(image, f.tree, extra, epoch=5, workdir=tmp_path / "w")
    ext4.check_filesystem(image)
    seen = read_image(image)
    for path, node in f.tree.walk():
        assert seen[path].ino == node.inode.ino, path
