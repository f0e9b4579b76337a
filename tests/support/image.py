"""Layers -> tree and spool -> a real ext4 image, checked by e2fsck, for tests that
exercise flatten and the writer without a registry."""

from __future__ import annotations

import hashlib
from pathlib import Path

from banger_build import ext4
from banger_build.flatten import Flattener, LayerInput
from banger_build.limits import Limits
from banger_build.spool import Spool
from banger_build.tree import Tree
from tests.support.ext4read import fsck

EPOCH = 1_600_000_000


def flatten_layers(
    tmp: Path, layers: list[LayerInput], limits: Limits | None = None, epoch: int = EPOCH
) -> tuple[Tree, Spool]:
    tmp.mkdir(parents=True, exist_ok=True)
    spool = Spool(tmp / f"spool-{len(list(tmp.glob('spool-*')))}")
    f = Flattener(spool, epoch, limits)
    for layer in layers:
        f.apply(layer)
    return f.tree, spool


def write_tree(
    tmp: Path,
    tree: Tree,
    spool: Spool,
    *,
    key: str = "k" * 32,
    epoch: int = EPOCH,
    auto: bool = True,
    size: int = 0,
    name: str = "rootfs.ext4",
) -> Path:
    """Plan, write and e2fsck an image of ``tree``; its path. The sha256 the writer
    gives (hashed behind its copies) must be the file's, read back whole."""
    plan = ext4.plan_size(tree, auto=auto, size=size)
    image = tmp / name
    written = ext4.write_image(
        image,
        tree,
        spool,
        plan,
        fs_uuid=ext4.derived_uuid(key, "fs-uuid"),
        hash_seed=ext4.derived_uuid(key, "hash-seed"),
        epoch=epoch,
    )
    with open(image, "rb") as f:  # an independent reader: no hole skipping
        assert written.sha256 == hashlib.file_digest(f, "sha256").hexdigest()
    ext4.check_filesystem(image)
    result = fsck(image)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return image


def build_image(
    tmp: Path,
    layers: list[LayerInput],
    *,
    key: str = "k" * 32,
    epoch: int = EPOCH,
    limits: Limits | None = None,
) -> Path:
    tree, spool = flatten_layers(tmp, layers, limits, epoch)
    with spool:
        return write_tree(tmp, tree, spool, key=key, epoch=epoch)
