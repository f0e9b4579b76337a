"""An image's tree against what its layers give, path by path.

``tree_mismatches(seen, expected, injected)`` compares what
``tests.support.ext4read.read_image`` read from a built ext4 image with
``tests.support.debian.expected_tree`` (the independent replay of the
layers' tar headers): type, owner, mode, symlink target, device numbers,
xattrs, content, mtime (not of directories, whose mtimes the build's own
writes below them move), hard-link groups and link counts. Paths the recipe
or the guest set wrote (``injected``) and the root are not compared.
``unexpected_paths`` is what the image holds that neither the layers nor
``injected`` explain.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from tests.support.debian import Expected

#: What mkfs and the guest set create beside the layers' paths.
ALWAYS_EXTRA = frozenset({"", "lost+found", "usr/local/libexec", "var/lib/banger"})


def tree_mismatches(
    seen: Mapping[str, Any], expected: Mapping[str, Expected], injected: Set[str]
) -> list[str]:
    """One line per path of ``expected`` the image has differently (or not at all)."""
    mismatches = []
    for path, exp in expected.items():
        if path == "" or path in injected:
            continue
        got = seen.get(path)
        if got is None:
            mismatches.append(f"{path}: missing")
            continue
        want = (exp.type, exp.uid, exp.gid, exp.mode, exp.linkname, exp.rdev, exp.xattrs)
        have = (
            got.type,
            got.uid,
            got.gid,
            got.mode,
            got.target if exp.linkname else None,
            got.rdev if exp.rdev else None,
            got.xattrs,
        )
        if want != have:
            mismatches.append(f"{path}: want {want}, have {have}")
        if exp.type == "reg" and (got.size, got.sha256) != (exp.size, exp.sha256):
            mismatches.append(f"{path}: content differs")
        if exp.type != "dir" and got.mtime != exp.mtime:
            mismatches.append(f"{path}: mtime {got.mtime} != {exp.mtime}")
        if exp.hardlink_group and seen[exp.hardlink_group].ino != got.ino:
            mismatches.append(f"{path}: not hard-linked to {exp.hardlink_group}")
        if exp.type != "dir" and got.links != exp.nlink:
            mismatches.append(f"{path}: {got.links} links, want {exp.nlink}")
    return mismatches


def unexpected_paths(
    seen: Mapping[str, Any], expected: Mapping[str, Expected], injected: Set[str]
) -> set[str]:
    """Paths of the image that neither the layers, ``injected`` nor ``ALWAYS_EXTRA`` explain."""
    return set(seen) - set(expected) - set(injected) - ALWAYS_EXTRA
