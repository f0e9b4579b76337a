"""``banger-build check RECIPE|STORE-PATH``: rebuild from scratch and compare bit for bit.

Nothing in the store changes. On a mismatch the first differing files are
named with what differs (content, owner, mode, times, xattrs, layout) and
the exit status is 1.

A store path (./result) is rebuilt from its recorded inputs, not from what its
recipe says today: the image by the manifest digest its manifest.json records,
the derivation's name, size, epoch, modes and owners. Only the bytes of files,
templates and local kernel files, which the record names by sha256, come from
the recipe it was built from (or --recipe). When those bytes or the image are
not to be had any more, or the path was written by another ext4 writer format,
one line says which.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from banger_build.commands import common

NAME = "check"
HELP = "rebuild a store path (of a recipe, or from its record) in a temp dir; compare bit for bit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=Path, help="a recipe, or a store path (e.g. ./result)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--recipe", type=Path, default=None,
        help="for a store path: take the bytes its record names by hash from this recipe "
        "(default: the recipe it was built from)",
    )  # fmt: skip
    common.add_lock_options(p)
    common.add_sources(p)
    common.add_overrides(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def run_check(args: argparse.Namespace, target: Path) -> int:
    """Check a recipe's store path, or a store path from its record; print the verdict."""
    from banger_build.build import check
    from banger_build.progress import Reporter
    from banger_build.recorded import check_store_path

    reporter = Reporter(quiet=getattr(args, "quiet", False))
    options = common.build_options(args)
    if target.is_dir():
        result = check_store_path(target, options, reporter, recipe=getattr(args, "recipe", None))
    else:
        result = check(target, options, reporter)
    if result.ok:
        print(f"ok: {result.path} is reproducible (rebuilt bit for bit)")
        return 0
    print(f"FAILED: {result.path} differs from a rebuild from the same inputs:")
    for line in result.differences:
        print(f"  {line}")
    return 1


def run(args: argparse.Namespace) -> int:
    return run_check(args, args.target)
