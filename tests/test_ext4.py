"""Sizing, mkfs parameters and reproducibility of the ext4 stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger_build import ext4
from banger_build.errors import ImageError
from banger_build.flatten import Flattener
from tests.support.ext4read import sha256_file
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
